"""The bench's cost model: subscriptions, readers and the bounds it predicts by."""

from __future__ import annotations

import pytest

from demo.benchmark.cost import ConsumerCpu, fit_split, is_reader
from demo.benchmark.model import Costs, hosts_for, line_fit, rate

COSTS = Costs(
    redis_1=5.0,
    redis_sub=0.3,
    owned=7.0,
    buffered=2.0,
    publisher=1.0,
    publisher_source="given",
    readers=2,
)


def test_partitioned_redis_cost_stops_growing_at_the_readers_of_a_host() -> None:
    assert COSTS.redis("partitioned", 1) == 5.0
    assert COSTS.redis("partitioned", 2) == pytest.approx(5.3)
    assert COSTS.redis("partitioned", 16) == pytest.approx(5.3)
    # Each host brings its own readers.
    assert COSTS.redis("partitioned", 16, hosts=4) == pytest.approx(5.0 + 0.3 * 7)
    assert COSTS.redis("race", 16) == pytest.approx(5.0 + 0.3 * 15)


def test_a_message_costs_the_group_its_owner_and_the_readers_that_do_not_own_it() -> None:
    assert COSTS.group("partitioned", 0.0, 1) == 7.0  # one consumer: it owns everything
    # 2 consumers, both readers: the owner processes it, the other only reads it.
    assert COSTS.group("partitioned", 0.0, 2) == pytest.approx(9.0)
    # 10 consumers, 2 readers: a reader owns 1 message in 5 of those it reads.
    assert COSTS.group("partitioned", 0.0, 10) == pytest.approx(7.0 + 1.8 * 2.0)
    assert COSTS.group("race", 3.0, 4) == pytest.approx(40.0)


def test_a_reader_that_reads_everything_can_be_the_bound() -> None:
    slow_reading = Costs(1.0, 0.0, 1.0, 50.0, 0.0, "given", readers=2)
    got = rate(slow_reading, "partitioned", 0.0, 8, cores=None)
    assert got.bound == "readers"
    assert got.msg_s == pytest.approx(1e6 / slow_reading.reader(0.0, 8))
    assert rate(COSTS, "race", 0.0, 8, cores=None).bound != "readers"


def test_hosts_hold_four_consumers_each() -> None:
    assert [hosts_for(n) for n in (1, 4, 5, 64)] == [1, 1, 2, 16]


def test_redis_line_is_fitted_over_subscribers_and_never_slopes_down() -> None:
    assert line_fit([(1, 5.0), (2, 5.4)]) == pytest.approx((5.0, 0.4))
    assert line_fit([(1, 5.0), (2, 4.0)])[1] == 0.0


def test_fed_consumers_count_only_their_own_messages_as_received() -> None:
    assert is_reader("partitioned", "host-a-100-0-abc")
    assert is_reader("partitioned", "host-101-1-abc")
    assert not is_reader("partitioned", "host-102-2-abc")
    assert is_reader("race", "host-102-7-abc")
    # Two readers that each read 1000 and own 500 at 2 µs + 7 µs, fed ones at 7 µs.
    points = [
        ConsumerCpu("r0", 1000, 250, 250 * 7.0 + 750 * 2.0),
        ConsumerCpu("r1", 1000, 250, 250 * 7.0 + 750 * 2.0),
        ConsumerCpu("f2", 250, 250, 250 * 7.0),
        ConsumerCpu("f3", 250, 250, 250 * 7.0),
    ]
    split = fit_split(points)
    assert split is not None
    assert split.owned_us == pytest.approx(7.0)
    assert split.buffered_us == pytest.approx(2.0)
