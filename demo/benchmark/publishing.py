"""The bench's own publisher process: messages built in advance, PUBLISH pipelined to a pace."""

from __future__ import annotations

import contextlib
import multiprocessing
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import hiredis
import redis
from hiredis import pack_command

from demo.benchmark.plan import DEFAULTS, STOP_TIMEOUT_S

PIPELINE_SIZE = 1000  # PUBLISH commands per publisher pipeline
TEXT = b"the quick brown fox jumps over the lazy dog, benchmark payload 0123"


@dataclass(frozen=True)
class PublishJob:
    count: int
    rate: float  # msg/s; 0 publishes as fast as the pipelines go
    tag: str  # keeps message ids unique across the whole bench


@dataclass(frozen=True)
class Published:
    target_rate: float
    count: int
    unreceived: int  # PUBLISH replied 0: no subscriber got the message
    first_ms: int  # wall clock of the first PUBLISH
    elapsed_s: float

    @property
    def rate(self) -> float:
        return self.count / self.elapsed_s if self.elapsed_s else 0.0


def message_heads(job: PublishJob) -> list[bytes]:
    """The messages, built in advance but for ``published_at``, which the send appends."""
    return [
        b'{"message_id":"%s-%08d","source":"bench","text":"%s","published_at":'
        % (job.tag.encode(), index, TEXT)
        for index in range(job.count)
    ]


def publish(sock: socket.socket, job: PublishJob) -> Published:
    """Publishes the job's messages, pipelined and paced; counts the ones nobody received.

    Commands are packed by hiredis and written to the socket directly, replies read with a
    hiredis reader: redis-py's pipeline costs several µs per command, which would make the
    publisher, not the consumers, the bottleneck of the benchmark.
    """
    heads = message_heads(job)
    channel = DEFAULTS.input_channel.encode()
    interval_s = PIPELINE_SIZE / job.rate if job.rate else 0.0
    reader = hiredis.Reader()
    unreceived = 0
    first_ms = 0
    started = time.monotonic()
    for number, start in enumerate(range(0, job.count, PIPELINE_SIZE)):
        # Pacing to a schedule, not synchronisation: the publisher keeps a steady rate.
        delay = started + number * interval_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent_ms = time.time_ns() // 1_000_000
        first_ms = first_ms or sent_ms
        tail = b"%d}" % sent_ms
        batch = heads[start : start + PIPELINE_SIZE]
        # hiredis types pack_command as taking a 1-tuple; it takes any tuple of arguments.
        commands = (pack_command((b"PUBLISH", channel, head + tail)) for head in batch)  # type: ignore[arg-type]
        sock.sendall(b"".join(commands))
        unreceived += _count_unreceived(sock, reader, len(batch))
    return Published(job.rate, job.count, unreceived, first_ms, time.monotonic() - started)


def _count_unreceived(sock: socket.socket, reader: hiredis.Reader, replies: int) -> int:
    unreceived = 0
    while replies:
        data = sock.recv(65536)
        if not data:
            raise redis.ConnectionError("Redis closed the publisher's connection")
        reader.feed(data)
        while replies and (reply := reader.gets()) is not False:
            if isinstance(reply, Exception):
                raise reply
            replies -= 1
            unreceived += reply == 0
    return unreceived


def publisher_loop(url: str, jobs: Connection) -> None:
    """The publisher process: runs jobs until it receives None."""
    client = redis.Redis.from_url(url)
    connection: Any = client.connection_pool.get_connection()
    connection.connect()
    try:
        while (job := jobs.recv()) is not None:
            jobs.send(publish(connection._sock, job))
    finally:
        connection.disconnect()
        client.close()


# A process of its own, so the publisher does not share the bench's GIL.
@contextlib.contextmanager
def publisher_process(url: str) -> Iterator[Connection]:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=publisher_loop, args=(url, theirs), name="bench-publisher")
    process.start()
    theirs.close()  # so a dead publisher reads as EOFError here, not as a hang
    try:
        yield ours
    finally:
        with contextlib.suppress(OSError):
            ours.send(None)
        process.join(STOP_TIMEOUT_S)
        if process.is_alive():
            process.kill()
