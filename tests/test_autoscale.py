"""Autoscale's decision rule, without Redis: grow when behind, shrink when idle, hold between."""

from __future__ import annotations

import pytest

from processor.bounds import Bounds, parse_bounds
from processor.consumer.stats import BusyMeter
from processor.errors import ConfigError
from processor.group.autoscale import BEHIND_BYTES, BEHIND_INBOX, Load, decide

BOUNDS = Bounds(1, 6)


def load(consumers: int, busy: float, inbox: int = 0, backlog: int = 0) -> Load:
    return Load(consumers, busy, inbox, backlog)


def test_saturated_consumers_grow_the_group_to_a_target_utilisation() -> None:
    decision = decide(2, load(2, 1.96), BOUNDS, cooling=False)
    assert decision.size == 3  # ceil(1.96 / 0.7)
    assert "busy 98% on average" in decision.reason


def test_a_growing_inbox_or_server_backlog_grows_the_group() -> None:
    assert decide(2, load(2, 0.5, inbox=BEHIND_INBOX + 1), BOUNDS, cooling=False).size == 3
    assert decide(2, load(2, 0.5, backlog=BEHIND_BYTES + 1), BOUNDS, cooling=False).size == 3


def test_a_group_with_consumers_standing_by_does_not_grow_but_still_shrinks() -> None:
    # Two readers saturated with a cheap handler, one fed consumer standing by: one more
    # would stand by too.
    behind = Load(3, 1.9, BEHIND_INBOX + 1, 0, standing_by=1)
    decision = decide(3, behind, BOUNDS, cooling=False)
    assert decision.size == 3
    assert "1 consumers stand by" in decision.reason
    assert decide(3, Load(3, 0.2, 0, 0, standing_by=1), BOUNDS, cooling=False).size == 2


def test_growth_stops_at_the_maximum() -> None:
    decision = decide(6, load(6, 6.0), BOUNDS, cooling=False)
    assert decision.size == 6
    assert "at the maximum" in decision.reason


def test_an_idle_group_shrinks_by_one_down_to_the_minimum() -> None:
    assert decide(3, load(3, 0.1), BOUNDS, cooling=False).size == 2
    assert decide(1, load(1, 0.0), BOUNDS, cooling=False).size == 1


def test_between_the_thresholds_the_group_holds() -> None:
    # 3 consumers 70% busy: two would be 105% busy, so no shrink; not behind, so no growth.
    assert decide(3, load(3, 2.1), BOUNDS, cooling=False).size == 3


def test_nothing_moves_while_cooling_down() -> None:
    assert decide(2, load(2, 2.0, inbox=50_000), BOUNDS, cooling=True).size == 2


def test_a_size_outside_the_bounds_is_brought_inside_even_while_cooling() -> None:
    assert decide(9, load(9, 0.0), BOUNDS, cooling=True).size == 6
    assert decide(0, load(0, 0.0), Bounds(2, 4), cooling=True).size == 2


@pytest.mark.parametrize("text", ["3", "0:2", "4:2", "a:b", "1:", ":3"])
def test_bad_bounds_are_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid AUTOSCALE"):
        parse_bounds(text)


def test_bounds_parse() -> None:
    assert parse_bounds("") is None
    assert parse_bounds("2:8") == Bounds(2, 8)


def test_busy_share_is_averaged_over_its_window_so_a_short_pause_is_not_idle() -> None:
    meter = BusyMeter(window_s=5.0)
    meter.share(now=0.0)
    meter.add(1.0)
    assert meter.share(now=1.0) == 1.0
    assert meter.share(now=2.0) == 0.5  # a second's pause: still half busy over the window
    assert meter.share(now=10.0) == 0.0  # idle for a whole window
