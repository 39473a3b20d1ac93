"""Which consumer tries which message: lane assignment, takeover and gap coverage."""

from __future__ import annotations

from collections import Counter

import pytest

from processor.consumer.ownership import (
    HANDOVER_GRACE_S,
    LANES,
    PartitionedStrategy,
    RaceStrategy,
    TakeoverBuffer,
    assign_lanes,
    lane_of,
    make_strategy,
)

MEMBERS = ["host-1-0-aaaaaa", "host-1-1-bbbbbb", "host-2-0-cccccc", "host-2-1-dddddd"]


def _one_payload_per_slot() -> list[bytes]:
    """A payload for every lane, so a test sees every lane's routing."""
    by_lane: dict[int, bytes] = {}
    index = 0
    while len(by_lane) < LANES:
        payload = b'{"message_id":"m-%d"}' % index
        by_lane.setdefault(lane_of(payload), payload)
        index += 1
    return [by_lane[lane] for lane in range(LANES)]


PAYLOADS = _one_payload_per_slot()


def no_downtime(now: float) -> float:
    return 0.0


def at_zero() -> float:
    """The clock of strategies driven with explicit times from 0."""
    return 0.0


def _strategy(members: list[str], me: str) -> PartitionedStrategy:
    strategy = PartitionedStrategy(60.0, 100_000, 600.0, no_downtime, at_zero)
    strategy.update(members, me, now=0.0)
    return strategy


# -- assign_lanes ---------------------------------------------------------------------------


def test_assignment_is_deterministic_and_independent_of_order() -> None:
    owners = assign_lanes(MEMBERS)
    assert owners == assign_lanes(list(reversed(MEMBERS)))
    assert owners == assign_lanes(set(MEMBERS))
    assert len(owners) == LANES
    assert set(owners) == set(MEMBERS)


def test_assignment_is_balanced() -> None:
    counts = Counter(assign_lanes(MEMBERS))
    for member in MEMBERS:
        assert LANES / 4 * 0.8 <= counts[member] <= LANES / 4 * 1.2, counts


def test_no_members_own_nothing() -> None:
    assert assign_lanes([]) == [None] * LANES


def test_removing_a_member_moves_only_its_slots() -> None:
    before = assign_lanes(MEMBERS)
    gone = MEMBERS[1]
    after = assign_lanes([member for member in MEMBERS if member != gone])
    moved = [lane for lane in range(LANES) if before[lane] != after[lane]]
    assert moved
    assert all(before[lane] == gone for lane in moved)
    assert gone not in after
    assert len(moved) == before.count(gone)


def test_adding_a_member_moves_slots_only_to_it() -> None:
    before = assign_lanes(MEMBERS)
    newcomer = "host-3-0-eeeeee"
    after = assign_lanes([*MEMBERS, newcomer])
    moved = [lane for lane in range(LANES) if before[lane] != after[lane]]
    assert moved
    assert all(after[lane] == newcomer for lane in moved)
    assert after.count(newcomer) == len(moved)


# -- split and update -----------------------------------------------------------------------


def test_split_routes_owned_and_buffers_the_rest() -> None:
    me = MEMBERS[2]
    owners = assign_lanes(MEMBERS)
    strategy = _strategy(MEMBERS, me)
    owned = strategy.split(PAYLOADS, now=0.0)
    expected = [payload for payload in PAYLOADS if owners[lane_of(payload)] == me]
    assert owned == expected  # in the order received
    assert strategy.buffered == LANES - len(expected)


def test_before_the_first_view_everything_is_buffered() -> None:
    strategy = PartitionedStrategy(60.0, 100_000, 600.0, no_downtime, at_zero)
    assert strategy.split(PAYLOADS[:10], now=0.0) == []
    assert strategy.buffered == 10


def test_on_the_first_view_everything_buffered_before_it_is_taken() -> None:
    """Received before we had a view: its owners by that view may never have received it (a
    reader that subscribed later, a consumer not yet fed), so we try all of it."""
    strategy = PartitionedStrategy(60.0, 100_000, 600.0, no_downtime, at_zero)
    strategy.split(PAYLOADS, now=0.0)
    taken = strategy.update(MEMBERS, MEMBERS[0], now=0.5)
    assert sorted(taken) == sorted(PAYLOADS)


def test_what_was_routed_to_a_departed_owner_is_returned_whoever_owns_it_next() -> None:
    me, gone = MEMBERS[0], MEMBERS[1]
    before = assign_lanes(MEMBERS)
    survivors = [member for member in MEMBERS if member != gone]
    after = assign_lanes(survivors)
    strategy = _strategy(MEMBERS, me)
    strategy.split(PAYLOADS, now=0.0)

    taken = strategy.update(survivors, me, now=1.0)

    # Not only the lanes that become mine: the next owner may be a newcomer that never
    # received them, so every survivor tries all of them and the lock picks one writer.
    expected = [p for p in PAYLOADS if before[lane_of(p)] == gone]
    assert any(after[lane_of(p)] != me for p in expected)
    assert sorted(taken) == sorted(expected)
    # From now on the lanes that became mine are routed to me.
    mine_now = [p for p in expected if after[lane_of(p)] == me]
    assert mine_now
    assert set(strategy.split(mine_now, now=1.0)) == set(mine_now)


def test_a_newcomer_takes_nothing_over_from_existing_members() -> None:
    me = MEMBERS[0]
    strategy = _strategy(MEMBERS, me)
    strategy.split(PAYLOADS, now=0.0)
    # Slots move from live members to the newcomer: nobody died, nothing to take over.
    assert strategy.update([*MEMBERS, "host-3-0-eeeeee"], me, now=1.0) == []


def test_slots_handed_to_a_newcomer_stay_ours_for_a_grace_period() -> None:
    me, newcomer = MEMBERS[0], "host-3-0-eeeeee"
    strategy = PartitionedStrategy(60.0, 100_000, 600.0, no_downtime)
    strategy.update(MEMBERS, me, now=0.0)
    handed = [
        p
        for p in PAYLOADS
        if assign_lanes(MEMBERS)[lane_of(p)] == me
        and assign_lanes([*MEMBERS, newcomer])[lane_of(p)] == newcomer
    ]
    assert handed
    strategy.update([*MEMBERS, newcomer], me, now=10.0)
    # Messages published before the newcomer subscribed may still be unread in our socket.
    assert strategy.split(handed, now=10.5) == handed
    strategy.update([*MEMBERS, newcomer], me, now=10.0 + HANDOVER_GRACE_S + 0.1)
    assert strategy.split(handed, now=12.0) == []


def test_every_survivor_tries_every_message_of_the_dead() -> None:
    gone = MEMBERS[3]
    survivors = MEMBERS[:3]
    before = assign_lanes(MEMBERS)
    strategies = {member: _strategy(MEMBERS, member) for member in survivors}
    for strategy in strategies.values():
        strategy.split(PAYLOADS, now=0.0)
    expected = sorted(p for p in PAYLOADS if before[lane_of(p)] == gone)
    for member in survivors:
        assert sorted(strategies[member].update(survivors, member, now=1.0)) == expected


# -- gap_reported ---------------------------------------------------------------------------


@pytest.mark.parametrize("reporter", MEMBERS)
def test_every_other_member_tries_what_was_routed_to_a_gap_reporter(reporter: str) -> None:
    owners = assign_lanes(MEMBERS)
    strategies = {member: _strategy(MEMBERS, member) for member in MEMBERS}
    for strategy in strategies.values():
        strategy.split(PAYLOADS, now=0.0)

    expected = sorted(payload for payload in PAYLOADS if owners[lane_of(payload)] == reporter)
    for member in MEMBERS:
        if member != reporter:
            # Not one successor: it may have been in a gap of its own at the same time.
            assert sorted(strategies[member].gap_reported(reporter, now=1.0)) == expected
    assert strategies[reporter].gap_reported(reporter, now=1.0) == []
    # A gap changes no ownership.
    assert strategies[reporter].split(expected, now=1.0) == expected


def test_gap_reported_by_a_stranger_covers_nothing() -> None:
    strategy = _strategy(MEMBERS, MEMBERS[0])
    strategy.split(PAYLOADS, now=0.0)
    assert strategy.gap_reported("not-a-member", now=1.0) == []


def test_buffered_counts_only_what_is_still_held_without_new_traffic() -> None:
    """The count reported after traffic stops: what aged out is gone, though no split() came
    to prune it (a takeover would not find it either)."""
    clock = [0.0]
    strategy = PartitionedStrategy(10.0, 100_000, 600.0, no_downtime, lambda: clock[0])
    strategy.update(MEMBERS, MEMBERS[0], now=0.0)
    strategy.split(PAYLOADS[:512], now=0.0)
    first = strategy.buffered
    strategy.split(PAYLOADS[512:], now=5.0)
    total = strategy.buffered
    assert 0 < first < total
    clock[0] = 9.9
    assert strategy.buffered == total
    clock[0] = 10.1
    assert strategy.buffered == total - first
    clock[0] = 40.0
    assert strategy.buffered == 0
    assert strategy.update(MEMBERS[1:], MEMBERS[1], now=40.0) == []


def test_discard_empties_the_buffer() -> None:
    strategy = _strategy(MEMBERS, MEMBERS[0])
    strategy.split(PAYLOADS, now=0.0)
    held = strategy.buffered
    assert held
    assert strategy.discard() == held
    assert strategy.buffered == 0
    assert strategy.update(MEMBERS[:3], MEMBERS[0], now=1.0) == []


# -- TakeoverBuffer -------------------------------------------------------------------------

OWNERS = ["x"] * LANES


def test_buffer_ages_only_while_redis_takes_commands() -> None:
    """Downtime (Redis away or refusing writes) stops the age: the owner could not write then
    either. Never past max_held_s, though: a takeover must not outlive the dedup window."""
    down = [0.0]
    buffer = TakeoverBuffer(1.0, 1000, 10.0, lambda now: down[0])
    buffer.add(PAYLOADS[0:2], now=0.0, owners=OWNERS)
    down[0] = 5.0  # Redis refused writes from 0.5 s to 5.5 s
    buffer.add(PAYLOADS[2:3], now=6.0, owners=OWNERS)  # 6 s old, 1 s of it with Redis up
    assert buffer.routed_to({"x"}, now=6.0) == PAYLOADS[0:3]
    buffer.add(PAYLOADS[3:4], now=6.2, owners=OWNERS)  # 1.2 s up: the first chunk goes
    assert buffer.routed_to({"x"}, now=6.2) == PAYLOADS[2:4]
    down[0] = 14.5  # down again, from 6.6 s on
    buffer.add(PAYLOADS[4:5], now=16.1, owners=OWNERS)  # the 6.0 chunk: held 10.1 s, goes
    assert buffer.routed_to({"x"}, now=16.1) == PAYLOADS[3:5]


def test_buffer_evicts_by_age() -> None:
    buffer = TakeoverBuffer(1.0, 1000, 600.0, no_downtime)
    buffer.add(PAYLOADS[0:3], now=0.0, owners=OWNERS)
    buffer.add(PAYLOADS[3:5], now=0.5, owners=OWNERS)
    assert len(buffer) == 5
    buffer.add(PAYLOADS[5:6], now=1.2, owners=OWNERS)  # the first chunk is now 1.2 s old
    assert len(buffer) == 3
    assert buffer.routed_to({"x"}, now=1.2) == PAYLOADS[3:6]
    buffer.add(PAYLOADS[6:7], now=5.0, owners=OWNERS)
    assert buffer.routed_to({"x"}, now=5.0) == PAYLOADS[6:7]


def test_buffer_retains_longer_while_told_within_the_held_limit() -> None:
    buffer = TakeoverBuffer(1.0, 1000, 10.0, no_downtime)
    buffer.add(PAYLOADS[0:3], now=0.0, owners=OWNERS)
    buffer.retain(5.0)  # a member has held a message unwritten that long
    assert buffer.routed_to({"x"}, now=4.9) == PAYLOADS[0:3]
    buffer.retain(60.0)  # never past max_held_s
    assert buffer.routed_to({"x"}, now=10.1) == []
    buffer.add(PAYLOADS[3:4], now=11.0, owners=OWNERS)
    buffer.retain(0.0)  # nobody holds anything: back to max_age_s
    assert buffer.routed_to({"x"}, now=12.1) == []


def test_buffer_evicts_the_oldest_by_count() -> None:
    buffer = TakeoverBuffer(60.0, 10, 600.0, no_downtime)
    for index in range(100):
        buffer.add([PAYLOADS[index]], now=index * 0.01, owners=OWNERS)
    assert len(buffer) == 10
    assert buffer.routed_to({"x"}, now=0.99) == PAYLOADS[90:100]


def test_buffer_count_bound_with_large_chunks() -> None:
    buffer = TakeoverBuffer(60.0, 100, 600.0, no_downtime)
    for start in range(0, 990, 30):
        buffer.add(PAYLOADS[start : start + 30], now=start * 0.001, owners=OWNERS)
        # Eviction is per chunk: it keeps at least the newest max_count, and less than one
        # chunk more.
        assert len(buffer) < 100 + 30
    kept = buffer.routed_to({"x"}, now=0.96)
    assert len(kept) == len(buffer)
    assert kept == PAYLOADS[990 - len(kept) : 990]


def test_buffer_returns_what_was_routed_to_given_members() -> None:
    buffer = TakeoverBuffer(60.0, 10_000, 600.0, no_downtime)
    owners: list[str | None] = ["a" if lane % 2 else "b" for lane in range(LANES)]
    buffer.add(PAYLOADS, now=0.0, owners=owners)
    assert buffer.routed_to({"a"}, now=0.0) == [PAYLOADS[lane] for lane in range(1, LANES, 2)]
    assert buffer.routed_to({"a", "b"}, now=0.0) == PAYLOADS
    assert buffer.routed_to(set(), now=0.0) == []
    assert buffer.since(0.0, now=0.0) == PAYLOADS
    assert buffer.since(0.1, now=0.0) == []


def test_buffer_read_after_a_quiet_spell_holds_nothing_too_old() -> None:
    """No add() prunes on a quiet channel: the read itself must, or a takeover long after
    would retry what the dedup window has forgotten (and write it again)."""
    buffer = TakeoverBuffer(10.0, 1000, 600.0, no_downtime)
    buffer.add(PAYLOADS[0:3], now=1.0, owners=OWNERS)
    assert buffer.routed_to({"x"}, now=5.0) == PAYLOADS[0:3]
    assert buffer.routed_to({"x"}, now=7200.0) == []
    buffer.add(PAYLOADS[3:4], now=7300.0, owners=OWNERS)
    assert buffer.since(0.0, now=7400.0) == []


# -- race -----------------------------------------------------------------------------------


def test_race_strategy_tries_everything_and_takes_nothing_over() -> None:
    strategy = make_strategy("race", 1.0, 10, 600.0)
    assert isinstance(strategy, RaceStrategy)
    assert strategy.split(PAYLOADS[:5], now=0.0) == PAYLOADS[:5]
    assert strategy.update(MEMBERS[1:], MEMBERS[1]) == []
    assert strategy.gap_reported(MEMBERS[0]) == []
    assert isinstance(make_strategy("partitioned", 1.0, 10, 600.0), PartitionedStrategy)
