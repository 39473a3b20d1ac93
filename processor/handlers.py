"""Message handlers: the default one, loading a user's, and running them with a time limit.

A handler takes the message (a dict) and returns the processed message (a dict). It may be a
plain function or an ``async def``. Handlers should be idempotent: after a consumer dies, the
consumer that takes over its share may run the handler once more for a message that was being
processed; the output stream still gets the message exactly once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import inspect
import logging
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import orjson

from processor.consumer.messages import Message, reason_kind
from processor.errors import HandlerLoadError, HandlerTimeout
from processor.observe.logs import Tagged

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Any]

_PROPERTIES = ("score", "rank", "weight", "priority", "confidence")


def add_random_score(message: dict[str, Any]) -> dict[str, Any]:
    """The default handler: adds a random property with a random value."""
    message[random.choice(_PROPERTIES)] = round(random.random(), 4)
    return message


def working_directory_on_path() -> None:
    """Puts the directory the daemon runs in on the import path, as rq, arq and celery do (the
    ``processor`` command has its script's directory there instead).

    Appended, not first: a stray ``redis.py`` or ``json.py`` there must not replace a library
    the daemon imports. Spawned consumers start in the parent's directory and find it too.
    """
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.append(here)


def load_handler(spec: str) -> Handler:
    """The callable named by ``package.module:function``, found on the path or in the working
    directory."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise HandlerLoadError(f"invalid HANDLER {spec!r}: expected package.module:function")
    working_directory_on_path()
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # a broken module raises anything at import time
        raise HandlerLoadError(
            f"invalid HANDLER {spec!r}: cannot import: {type(error).__name__}: {error}"
        ) from None
    target: Any = module
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise HandlerLoadError(f"invalid HANDLER {spec!r}: {module_name} has no {attribute}")
    if not callable(target):
        raise HandlerLoadError(f"invalid HANDLER {spec!r}: not callable")
    return target  # type: ignore[no-any-return]


class Failure:
    """A handler call that did not produce a result: the reason goes to the dead-letter stream,
    the exception it raised (none for a timeout) to the log."""

    __slots__ = ("error", "reason")

    def __init__(self, reason: str, error: BaseException | None = None) -> None:
        self.reason = reason
        self.error = error


def _describe(error: BaseException) -> str:
    return f"handler raised {type(error).__name__}: {error}"


class InlineRunner:
    """Calls a plain handler in this thread; a timeout interrupts it with SIGALRM (main thread)."""

    def __init__(self, handler: Handler, timeout_s: float) -> None:
        self._handler = handler
        self._timeout_s = timeout_s
        self._armed = False
        self._use_alarm = timeout_s > 0 and threading.current_thread() is threading.main_thread()
        if self._use_alarm:
            signal.signal(signal.SIGALRM, self._on_alarm)
        elif timeout_s > 0:
            log.warning("handler timeout not enforced: consumer not in the main thread")

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        # The alarm may fire just after the handler returned; only raise while it runs.
        if self._armed:
            raise HandlerTimeout

    def run(self, messages: Sequence[dict[str, Any]]) -> list[object]:
        results: list[object] = []
        for message in messages:
            try:
                if self._use_alarm:
                    self._armed = True
                    signal.setitimer(signal.ITIMER_REAL, self._timeout_s)
                    try:
                        results.append(self._handler(message))
                    finally:
                        self._armed = False
                        signal.setitimer(signal.ITIMER_REAL, 0)
                else:
                    results.append(self._handler(message))
            except HandlerTimeout:
                results.append(Failure(f"handler timed out after {self._timeout_s:g} s"))
            except Exception as error:
                results.append(Failure(_describe(error), error))
        return results

    def close(self) -> None:
        if self._use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)


class ThreadedRunner:
    """Runs a plain handler on a thread pool, ``concurrency`` calls at once.

    A call past the timeout is reported as a failure, but its thread cannot be stopped: it keeps
    a pool slot until the handler returns.
    """

    def __init__(self, handler: Handler, timeout_s: float, concurrency: int) -> None:
        self._handler = handler
        self._timeout_s = timeout_s or None
        self._concurrency = concurrency
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="handler"
        )

    def run(self, messages: Sequence[dict[str, Any]]) -> list[object]:
        started: dict[int, float] = {}

        def call(index: int, message: dict[str, Any]) -> Any:
            started[index] = time.monotonic()
            return self._handler(message)

        futures = [
            self._pool.submit(call, index, message) for index, message in enumerate(messages)
        ]
        # Each call gets timeout_s from its own start, not from when we get round to waiting
        # for it; one still queued behind hung calls fails when the batch's rounds are up.
        batch_deadline = None
        if self._timeout_s is not None:
            rounds = -(-len(futures) // self._concurrency)
            batch_deadline = time.monotonic() + rounds * self._timeout_s
        results: list[object] = []
        for index, future in enumerate(futures):
            results.append(self._result(future, index, started, batch_deadline))
        return results

    def _result(
        self,
        future: concurrent.futures.Future[Any],
        index: int,
        started: dict[int, float],
        batch_deadline: float | None,
    ) -> object:
        while True:
            begun = started.get(index)
            timeout = None
            if self._timeout_s is not None and batch_deadline is not None:
                deadline = batch_deadline if begun is None else begun + self._timeout_s
                timeout = max(0.0, deadline - time.monotonic())
            try:
                return future.result(timeout=timeout)
            except concurrent.futures.TimeoutError:
                if begun is None and started.get(index) is not None:
                    continue  # it got a thread while we waited: give it its own timeout_s
                future.cancel()
                return Failure(f"handler timed out after {self._timeout_s:g} s")
            except Exception as error:
                return Failure(_describe(error), error)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class AsyncRunner:
    """Runs an ``async def`` handler on one event loop, ``concurrency`` calls at once."""

    def __init__(self, handler: Handler, timeout_s: float, concurrency: int) -> None:
        self._handler = handler
        self._timeout_s = timeout_s or None
        self._concurrency = concurrency
        self._loop = asyncio.new_event_loop()

    async def _one(self, message: dict[str, Any], gate: asyncio.Semaphore) -> object:
        async with gate:
            try:
                return await asyncio.wait_for(self._handler(message), self._timeout_s)
            except TimeoutError:
                return Failure(f"handler timed out after {self._timeout_s:g} s")
            except Exception as error:
                return Failure(_describe(error), error)

    async def _all(self, messages: Sequence[dict[str, Any]]) -> list[object]:
        gate = asyncio.Semaphore(self._concurrency)
        return list(await asyncio.gather(*(self._one(message, gate) for message in messages)))

    def run(self, messages: Sequence[dict[str, Any]]) -> list[object]:
        return self._loop.run_until_complete(self._all(messages))

    def close(self) -> None:
        self._loop.close()


Runner = InlineRunner | ThreadedRunner | AsyncRunner

# HANDLER_RETRIES' first pause; each retry waits twice as long as the one before.
RETRY_FIRST_DELAY_S = 0.1


def run_with_retries(
    runner: Runner, messages: Sequence[Message], retries: int, stop: threading.Event
) -> list[object]:
    """The handler's results for ``messages``, those it raised on tried again up to ``retries``
    times, after 0.1 s, 0.2 s, 0.4 s...

    The batch's failures are retried together, one pause per round, so a batch waits for the
    pauses once however many of its messages fail. A time-out is not retried: it has cost its
    HANDLER_TIMEOUT already, and a thread past it may still be running. Each try gets the
    message as received (parsed again), not what a failed call may have changed in it. Once
    the consumer is stopping the pauses are cut short, the tries are not.
    """
    results = runner.run([message.body for message in messages])
    delay = RETRY_FIRST_DELAY_S
    for _ in range(retries):
        again = [
            index
            for index, result in enumerate(results)
            if isinstance(result, Failure) and result.error is not None
        ]
        if not again:
            break
        stop.wait(delay)
        delay *= 2
        fresh = [orjson.loads(messages[index].raw) for index in again]
        for index, result in zip(again, runner.run(fresh), strict=True):
            results[index] = result
    return results


# Failures that raised nothing, named in the count line by their dead-letter reason's kind.
_KIND_NAMES = {"handler_timeout": "timeout", "handler_result": "bad result"}


class FailureLog:
    """Handler failures in the log, never a line per message: the first of each kind (the
    exception's type, or ``timeout``, ``bad result``) with its traceback, then a count line
    per ``interval_s`` in which there were any. Used by one thread."""

    def __init__(
        self,
        interval_s: float,
        tagged: Tagged,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval_s = interval_s
        self._log = tagged.on(log)
        self._clock = clock
        self._logged: set[str] = set()
        self._counts: Counter[str] = Counter()
        self._since = 0.0

    def failed(self, message_id: str, reason: str, error: BaseException | None = None) -> None:
        if error is not None:
            kind = type(error).__name__
        else:
            kind = _KIND_NAMES.get(reason_kind(reason), reason_kind(reason))
        if not self._counts:
            self._since = self._clock()
        self._counts[kind] += 1
        if kind in self._logged:
            return
        self._logged.add(kind)
        self._log.error(
            "handler failed (%s) on message_id %r: %s; later failures are counted, "
            "not logged one by one",
            kind,
            message_id,
            reason,
            exc_info=error,
        )

    def report(self, final: bool = False) -> None:
        """The count line, once ``interval_s`` has passed since the first failure it counts
        (``final``: whatever is counted, now)."""
        if not self._counts:
            return
        elapsed = self._clock() - self._since
        if elapsed < self._interval_s and not final:
            return
        total = self._counts.total()
        kinds = ", ".join(f"{kind} {count:,}" for kind, count in self._counts.most_common())
        self._log.warning(
            "handler failed %s in the last %.1f s (%s); the first of each kind is logged above",
            f"{total:,} times" if total != 1 else "1 time",
            elapsed,
            kinds,
        )
        self._counts.clear()


def make_runner(handler: Handler, timeout_s: float, concurrency: int) -> Runner:
    if inspect.iscoroutinefunction(handler):
        return AsyncRunner(handler, timeout_s, concurrency)
    if concurrency > 1:
        return ThreadedRunner(handler, timeout_s, concurrency)
    return InlineRunner(handler, timeout_s)
