"""The feeds between a reader and the consumers it feeds, in one process: a real
:class:`Forwarder` and :class:`Feed` over Unix sockets, a real ownership strategy, and a
stand-in for the reader's subscriptions (whose state the tests set)."""

from __future__ import annotations

import logging
import os
import pickle
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

import pytest

from processor.consumer.feed import Feed
from processor.consumer.feeds import ACK, HELLO, MESSAGES, FeedPlan, connect, listen
from processor.consumer.forwarder import Forwarder
from processor.consumer.ownership import LANES, PartitionedStrategy, assign_lanes, lane_of
from processor.consumer.subscriber import Gap
from processor.observe.logs import Tagged
from tests.helpers import wait_until

log = logging.getLogger(__name__)


class Subscriptions:
    """What an Outlet asks of its reader's subscriptions."""

    def __init__(self) -> None:
        self.subscribed = True
        self.subscriptions = 1

    def is_subscribed(self) -> bool:
        return self.subscribed


class Reader:
    """A reader's strategy and forwarder, routing what the test hands it."""

    def __init__(self, address: str, members: list[str], me: str, max_queued: int = 10_000):
        self.strategy = PartitionedStrategy(60.0, 100_000, 600.0, lambda now: 0.0)
        self.strategy.update(members, me)
        self.subscriptions = Subscriptions()
        self.failures: list[BaseException] = []
        self.forwarder = Forwarder(
            address,
            self.strategy,
            self.subscriptions,  # type: ignore[arg-type]
            Tagged(log, lambda: f"[{me}]"),
            on_failure=lambda name, error: self.failures.append(error),
            max_queued=max_queued,
        )
        self.forwarder.start()

    def route(self, payloads: list[bytes]) -> list[bytes]:
        return self.strategy.split(payloads, time.monotonic())

    def stop(self) -> None:
        self.forwarder.stop()
        self.forwarder.join(5)


class Fed:
    """A fed consumer's Feed, recording what it delivers and the gaps it reports."""

    def __init__(self, addresses: list[str], member: str, stall_s: float = 1.0) -> None:
        self.delivered: list[bytes] = []
        self.gaps: list[Gap] = []
        self.failures: list[BaseException] = []
        self.lock = threading.Lock()
        self.feed = Feed(
            addresses,
            deliver=self._deliver,
            on_gap=self.gaps.append,
            tagged=Tagged(log, lambda: f"[{member}]"),
            stall_s=stall_s,
            on_failure=lambda name, error: self.failures.append(error),
        )
        self.feed.rename(member)
        self.feed.start()

    def _deliver(self, payloads: list[bytes]) -> None:
        with self.lock:
            self.delivered.extend(payloads)

    def received(self) -> list[bytes]:
        with self.lock:
            return list(self.delivered)


def payloads_of(member: str, members: list[str], count: int) -> list[bytes]:
    """``count`` distinct payloads whose lanes ``member`` owns among ``members``."""
    owners = assign_lanes(members)
    found: list[bytes] = []
    n = 0
    while len(found) < count:
        payload = f'{{"message_id": "m-{n}"}}'.encode()
        if owners[lane_of(payload)] == member:
            found.append(payload)
        n += 1
    return found


@pytest.fixture
def plan() -> FeedPlan:
    return FeedPlan(f"processor-test-{os.getpid()}-{secrets.token_hex(4)}", readers=2)


MEMBERS = ["reader-0", "reader-1", "fed-2"]


def test_a_plan_spreads_fed_consumers_over_the_readers(plan: FeedPlan) -> None:
    assert [plan.is_reader(slot) for slot in range(4)] == [True, True, False, False]
    assert plan.addresses_for(2) == [plan.address(0), plan.address(1)]
    assert plan.addresses_for(3) == [plan.address(1), plan.address(0)]
    assert plan.address(0).startswith("\0")  # abstract: nothing on disk after a kill -9
    assert len({lane_of(f"{n}".encode()) for n in range(20_000)}) == LANES


def test_a_reader_forwards_a_fed_consumers_share_and_keeps_a_copy(plan: FeedPlan) -> None:
    reader = Reader(plan.address(0), MEMBERS, "reader-0")
    fed = Fed([plan.address(0)], "fed-2")
    try:
        assert fed.feed.wait_subscribed(5), "never fed"
        assert fed.gaps == [] and fed.feed.reader == 0
        theirs = payloads_of("fed-2", MEMBERS, 50)
        mine = payloads_of("reader-0", MEMBERS, 5)
        others = payloads_of("reader-1", MEMBERS, 5)
        assert reader.route(theirs + mine + others) == mine
        wait_until(lambda: fed.received() == theirs, 5, message="not forwarded in order")
        # Every payload it does not own stays in its takeover buffer, the forwarded ones too.
        assert reader.strategy.buffered == 55
        assert sorted(reader.strategy.gap_reported("fed-2")) == sorted(theirs)
        assert reader.forwarder.fed == 1
    finally:
        fed.feed.stop()
        reader.stop()
    assert not reader.failures and not fed.failures


def test_a_lost_subscription_moves_the_fed_consumer_to_the_other_reader_and_reports_a_gap(
    plan: FeedPlan,
) -> None:
    first = Reader(plan.address(0), MEMBERS, "reader-0")
    second = Reader(plan.address(1), MEMBERS, "reader-1")
    fed = Fed(plan.addresses_for(2), "fed-2")
    try:
        assert fed.feed.wait_subscribed(5) and fed.feed.reader == 0
        first.subscriptions.subscribed = False  # the first reader's connection dropped
        wait_until(lambda: fed.feed.reader == 1, 5, message="did not move to the other reader")
        wait_until(lambda: len(fed.gaps) == 1, 5, message="gap not reported")
        # Reported once fed again: whatever the other reader routed to us before is buffered.
        theirs = payloads_of("fed-2", MEMBERS, 20)
        second.route(theirs)
        wait_until(lambda: fed.received() == theirs, 5, message="the second reader did not feed")
        assert fed.feed.gaps == 1
    finally:
        fed.feed.stop()
        first.stop()
        second.stop()


def test_a_silent_reader_is_left_after_the_stall_time(plan: FeedPlan) -> None:
    """A stalled reader (SIGSTOP) sends nothing, not even a tick: its socket still accepts."""
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(plan.address(0))
    silent.listen(8)
    second = Reader(plan.address(1), MEMBERS, "reader-1")
    fed = Fed(plan.addresses_for(2), "fed-2", stall_s=0.3)
    try:
        # The preferred reader never answers the hello: after its wait, the other one feeds.
        assert fed.feed.wait_subscribed(15), "never fed by the second reader"
        assert fed.feed.reader == 1
    finally:
        fed.feed.stop()
        second.stop()
        silent.close()


def test_a_reader_stalled_inside_a_frame_is_left_after_the_stall_time(plan: FeedPlan) -> None:
    """Frames of more than 16 KiB go out in two writes, so a reader stopped (SIGSTOP) while
    sending often leaves half a frame: the wait inside it is bounded too."""
    stalled = listen(plan.address(0))
    second = Reader(plan.address(1), MEMBERS, "reader-1")
    fed = Fed(plan.addresses_for(2), "fed-2", stall_s=0.3)
    try:
        sock, _ = stalled.accept()
        with Connection(sock.detach()) as connection:
            assert connection.recv() == (HELLO, "fed-2")
            connection.send((ACK, "fed-2"))
            frame = pickle.dumps((MESSAGES, [b"x" * 200] * 2000))
            with socket.socket(fileno=os.dup(connection.fileno())) as raw:
                raw.sendall(struct.pack("!i", len(frame)) + frame[:1000])
            # Then nothing, and the connection stays open: the fed consumer moves on its own.
            wait_until(lambda: fed.feed.reader == 1, 10, message="still waiting inside the frame")
        assert fed.feed.wait_subscribed(5)
        wait_until(lambda: len(fed.gaps) == 1, 5, message="no gap reported")
        assert not fed.failures
    finally:
        fed.feed.stop()
        second.stop()
        stalled.close()


# Another process of the same user: a connection to an abstract socket needs no permission.
STRANGER = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
address = "\\0" + sys.argv[2]  # abstract: a NUL cannot be in an argument
if sys.argv[1] == "connect":
    s.connect(address)
    s.settimeout(10)
    print(repr(s.recv(100)), flush=True)
else:
    s.bind(address)
    s.listen(1)
    print("listening", flush=True)
    time.sleep(30)
"""


def test_a_reader_refuses_a_process_that_is_not_one_of_the_daemons(plan: FeedPlan) -> None:
    reader = Reader(plan.address(0), MEMBERS, "reader-0")
    try:
        wait_until(lambda: reader.forwarder.listening, 5, message="not listening")
        stranger = [sys.executable, "-c", STRANGER, "connect", plan.address(0)[1:]]
        answer = subprocess.run(stranger, capture_output=True, text=True, timeout=30)
        assert answer.stdout.strip() == "b''", answer  # closed at once, never read
        assert reader.forwarder.fed == 0
    finally:
        reader.stop()


def test_a_fed_consumer_refuses_a_socket_held_by_a_process_not_of_the_daemon(
    plan: FeedPlan,
) -> None:
    """A reader's address taken by another process (after the reader died) is not a reader."""
    args = [sys.executable, "-c", STRANGER, "listen", plan.address(0)[1:]]
    with subprocess.Popen(args, stdout=subprocess.PIPE, text=True) as stranger:
        try:
            assert stranger.stdout is not None and stranger.stdout.readline() == "listening\n"
            with pytest.raises(ConnectionRefusedError, match="not held by a reader of ours"):
                connect(plan.address(0), 5, 5)
        finally:
            stranger.kill()


def test_a_consumer_that_stops_reading_cannot_grow_the_readers_memory(plan: FeedPlan) -> None:
    reader = Reader(plan.address(0), MEMBERS, "reader-0", max_queued=1000)
    wait_until(lambda: reader.forwarder.listening, 5, message="not listening")
    connection = connect(plan.address(0), 5, 5)
    try:
        connection.send((HELLO, "fed-2"))
        assert connection.poll(5) and connection.recv() == (ACK, "fed-2")
        # It stops reading: the socket fills, then the queue, past which nothing is queued.
        theirs = payloads_of("fed-2", MEMBERS, 200)
        for _ in range(300):
            assert reader.route(theirs) == []
        routed = 300 * len(theirs)
        # Reading again, it gets what was in flight, then the end of the feed: not all of it.
        got = 0
        while True:
            assert connection.poll(5), "the feed neither sent nor ended"
            try:
                kind, value = connection.recv()
            except EOFError:
                break
            if kind == MESSAGES:
                got += len(value)
        assert got < routed, (got, routed)
        wait_until(lambda: reader.forwarder.fed == 0, 5, message="still counted as fed")
        # What it did not get is still in the reader's takeover buffer, for the gap it reports.
        assert reader.strategy.buffered == routed
    finally:
        connection.close()
        reader.stop()
    assert not reader.failures


def outlets_alive(reader: Reader) -> int:
    return sum(outlet.is_alive() for outlet in reader.forwarder._outlets)


def test_a_hello_given_up_on_by_its_consumer_ends_its_outlet(plan: FeedPlan) -> None:
    """While a reader cannot subscribe (Redis away), every fed consumer says hello, waits for an
    answer, gives up and tries again; each try left a thread that waited for good (hundreds in
    a long outage, each waking every 20 ms), then fed a consumer that was gone."""
    reader = Reader(plan.address(0), MEMBERS, "reader-0")
    reader.subscriptions.subscribed = False
    try:
        wait_until(lambda: reader.forwarder.listening, 5, message="the reader never listened")
        for _ in range(3):
            connection = connect(plan.address(0), 1.0, 1.0)
            connection.send((HELLO, "fed-2"))
            wait_until(lambda: outlets_alive(reader) == 1, 5, message="hello not taken")
            connection.close()  # as a Feed does when no answer comes
            wait_until(lambda: outlets_alive(reader) == 0, 5, message="the outlet waits on")
        reader.subscriptions.subscribed = True
        fed = Fed([plan.address(0)], "fed-2")
        try:
            assert fed.feed.wait_subscribed(5), "never fed"
            theirs = payloads_of("fed-2", MEMBERS, 20)
            reader.route(theirs)
            wait_until(lambda: fed.received() == theirs, 5, message="not fed")
        finally:
            fed.feed.stop()
    finally:
        reader.stop()


def test_an_outlet_whose_consumer_another_feed_took_ends_so_the_consumer_moves(
    plan: FeedPlan,
) -> None:
    """Two feeds of one consumer in one reader (a stale hello answered late): when the other
    feed replaces or drops this one's routing, this one must end, not go on ticking with
    nothing routed to it while the messages age out of the buffers."""
    first = Reader(plan.address(0), MEMBERS, "reader-0")
    second = Reader(plan.address(1), MEMBERS, "reader-1")
    fed = Fed(plan.addresses_for(2), "fed-2")
    try:
        assert fed.feed.wait_subscribed(5) and fed.feed.reader == 0
        first.strategy.unfeed("fed-2", first.strategy._fed["fed-2"])  # as a stale outlet's end
        wait_until(lambda: fed.feed.reader == 1, 5, message="the fed consumer stayed unrouted")
        wait_until(lambda: len(fed.gaps) == 1, 5, message="gap not reported")
        theirs = payloads_of("fed-2", MEMBERS, 20)
        second.route(theirs)
        wait_until(lambda: fed.received() == theirs, 5, message="the second reader did not feed")
    finally:
        fed.feed.stop()
        first.stop()
        second.stop()
