"""The split of the group's desired size over the live hosts: the rule the README states."""

from __future__ import annotations

import pytest

from processor.group.shares import split


def test_even_split_gives_the_remainder_to_the_first_hosts_by_id() -> None:
    result = split(5, {"vm-b": 8, "vm-a": 8})
    assert result.shares == {"vm-a": 3, "vm-b": 2}
    assert result.shortfall == 0


def test_fifty_over_ten_hosts_is_five_each() -> None:
    hosts = {f"host-{n:02}": 16 for n in range(10)}
    assert set(split(50, hosts).shares.values()) == {5}


def test_more_hosts_than_consumers_leaves_the_last_hosts_empty() -> None:
    assert split(2, {"a": 4, "b": 4, "c": 4}).shares == {"a": 1, "b": 1, "c": 0}


def test_a_host_at_its_ceiling_passes_the_rest_to_the_others() -> None:
    result = split(10, {"a": 2, "b": 8, "c": 8})
    assert result.shares == {"a": 2, "b": 4, "c": 4}
    assert result.shortfall == 0


def test_what_no_host_may_run_is_the_shortfall() -> None:
    result = split(12, {"a": 4, "b": 4})
    assert result.shares == {"a": 4, "b": 4}
    assert result.shortfall == 4


@pytest.mark.parametrize("desired", range(0, 40))
def test_every_split_places_what_fits_and_respects_every_ceiling(desired: int) -> None:
    ceilings = {"a": 1, "b": 7, "c": 3, "d": 10}
    result = split(desired, ceilings)
    assert all(result.shares[host] <= limit for host, limit in ceilings.items())
    assert sum(result.shares.values()) == min(desired, sum(ceilings.values()))
    assert result.shortfall == desired - sum(result.shares.values())
    # Fair: two hosts with room differ by at most one.
    with_room = [n for host, n in result.shares.items() if n < ceilings[host]]
    assert not with_room or max(with_room) - min(with_room) <= 1


def test_no_hosts_means_all_short() -> None:
    assert split(3, {}).shortfall == 3
