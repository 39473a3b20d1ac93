"""Waiting Redis out: the one back-off, outage log and retry loop every reconnect uses."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from processor.errors import RetryGaveUp, RetryStopped, WrongType
from processor.observe.logs import Tagged
from processor.store.connection import CONNECTION_ERRORS, REFUSALS, explain, refused_credentials

log = logging.getLogger(__name__)

T = TypeVar("T")


class Backoff:
    """Capped exponential back-off with full jitter, reset by the caller after a success."""

    def __init__(self, base_s: float, cap_s: float) -> None:
        self._base_s = base_s
        self._cap_s = cap_s
        self._failures = 0

    def next_delay(self) -> float:
        ceiling = min(self._cap_s, self._base_s * 2**self._failures)
        self._failures += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._failures = 0


class Downtime:
    """How long, in this process, some Outage has been on (Redis unreachable or refusing us).

    The takeover buffer ages only outside it: while writes fail here they fail for the owners
    too, so a message received then may still be unwritten, however old.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: set[int] = set()
        self._since = 0.0
        self._total_s = 0.0

    def begin(self, outage: object, now: float) -> None:
        with self._lock:
            if not self._active:
                self._since = now
            self._active.add(id(outage))

    def end(self, outage: object, now: float) -> None:
        with self._lock:
            if id(outage) not in self._active:
                return
            self._active.discard(id(outage))
            if not self._active:
                self._total_s += now - self._since

    def total_s(self, now: float) -> float:
        with self._lock:
            return self._total_s + (now - self._since if self._active else 0.0)


DOWNTIME = Downtime()


# While an outage lasts, a line this often (seconds): an operator watching the log sees that
# we still wait, for what and why, without a line per retry. A variable, so tests shorten it.
OUTAGE_REPEAT_S = 30.0


class Outage:
    """Logs an outage when it starts, every OUTAGE_REPEAT_S while it lasts, and when it ends.

    ``tagged`` starts the lines with who logs them (see :class:`Tagged`); ``detail`` adds what
    the caller holds meanwhile (for example "holding 120 messages") to the start and repeat
    lines; ``url`` lets them name a TLS mismatch (see :func:`explain`); ``on_recovered`` hears
    of the end of each outage, by what it was about (the metrics).
    """

    def __init__(
        self,
        what: str,
        tagged: Tagged | None = None,
        detail: Callable[[], str] | None = None,
        url: str = "",
        on_recovered: Callable[[str], None] | None = None,
    ) -> None:
        self.what = what
        self._on_recovered = on_recovered
        self._log: logging.Logger | Tagged = log if tagged is None else tagged.on(log)
        self._detail = detail
        self._url = url
        self._started: float | None = None
        self._logged_at = 0.0
        self._attempts = 0
        self.error: BaseException | None = None

    @property
    def active(self) -> bool:
        return self._started is not None

    def length_s(self) -> float:
        """How long the outage on has lasted so far (0 when none is on)."""
        return 0.0 if self._started is None else time.monotonic() - self._started

    def describe(self) -> str:
        """How many attempts failed and the last error: for a caller that gives up waiting."""
        error = "" if self.error is None else explain(self.error, self._url)
        plural = "" if self._attempts == 1 else "s"
        return f"{self._attempts} failed attempt{plural}; the last: {error}"

    def failed(self, error: BaseException) -> None:
        self._attempts += 1
        self.error = error
        now = time.monotonic()
        starting = self._started is None
        if self._started is None:
            self._started = now
            DOWNTIME.begin(self, now)
        if refused_credentials(error) is not None:
            # Not a blip: a rotated password needs an operator, so say it on every attempt.
            self._log.error(
                "%s refused our credentials (attempt %d): %s; fix REDIS_URL's password "
                "and restart, or restore the old one; retrying%s",
                self.what,
                self._attempts,
                str(error).rstrip("."),
                self._details(),
            )
            return
        if starting:
            self._log_start(error)
        elif now - self._logged_at >= OUTAGE_REPEAT_S:
            self._log_repeat(error, now - self._started)
        else:
            return
        self._logged_at = now

    def _details(self) -> str:
        text = self._detail() if self._detail is not None else ""
        return f"; {text}" if text else ""

    def _log_start(self, error: BaseException) -> None:
        if isinstance(error, REFUSALS):
            mended = (
                "that key is deleted or renamed"
                if isinstance(error, WrongType)
                else "Redis takes writes again"
            )
            self._log.error(
                "%s refused: %s %s; retrying until %s%s",
                self.what,
                error.status_code,
                str(error).rstrip("."),
                mended,
                self._details(),
            )
        else:
            self._log.warning(
                "%s unavailable: %s; retrying%s",
                self.what,
                explain(error, self._url),
                self._details(),
            )

    def _log_repeat(self, error: BaseException, length_s: float) -> None:
        if isinstance(error, REFUSALS):
            self._log.error(
                "%s still refused after %.0f s (%d failed attempts): %s %s; retrying%s",
                self.what,
                length_s,
                self._attempts,
                error.status_code,
                str(error).rstrip("."),
                self._details(),
            )
        else:
            self._log.warning(
                "%s still unavailable after %.0f s (%d failed attempts): %s; retrying%s",
                self.what,
                length_s,
                self._attempts,
                explain(error, self._url),
                self._details(),
            )

    def recovered(self) -> float:
        """Ends the outage, if any; returns its length in seconds."""
        if self._started is None:
            return 0.0
        now = time.monotonic()
        DOWNTIME.end(self, now)
        length = now - self._started
        self._log.warning(
            "%s back after %.2f s (%d failed attempts)",
            self.what,
            length,
            self._attempts,
        )
        self._started = None
        self._attempts = 0
        self.error = None
        if self._on_recovered is not None:
            self._on_recovered(self.what)
        return length


class Retrier:
    """Calls Redis until it answers, as every loop of ours waits an outage out: each failure is
    logged through ``outage`` and followed by a pause from ``backoff``; the first success ends
    the outage and resets the back-off. Shaped like redis-py's ``Retry.call_with_retry``.

    ``stop`` cuts a pause short and ends the retries (RetryStopped); without it a pause is
    slept through, for a caller whose stop request must not cut its retries short. ``errors``
    are what is retried; anything else goes to the caller at once.
    """

    def __init__(
        self,
        outage: Outage,
        backoff: Backoff,
        stop: threading.Event | None = None,
        errors: tuple[type[BaseException], ...] = CONNECTION_ERRORS,
    ) -> None:
        self.outage = outage
        self._backoff = backoff
        self._stop = stop
        self._errors = errors

    def call(
        self,
        do: Callable[[], T],
        deadline: float | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> T:
        """``do()``'s result, once it returns. ``on_error`` hears of each failure after it is
        logged and may end the retries by raising; past ``deadline`` (monotonic) a failure
        raises RetryGaveUp, and a pause never lasts beyond it."""
        while True:
            try:
                result = do()
            except self._errors as error:
                self.outage.failed(error)
                if on_error is not None:
                    on_error(error)
                if not self.pause(deadline):
                    raise RetryStopped(self.outage.what) from error
                continue
            self.succeeded()
            return result

    def failed(self, error: BaseException) -> bool:
        """For a loop that is more than one call: logs a failure and pauses. False once
        ``stop`` is set."""
        self.outage.failed(error)
        return self.pause()

    def pause(self, deadline: float | None = None) -> bool:
        """The back-off's next pause, never past ``deadline`` (raises RetryGaveUp once there).
        False once ``stop`` is set."""
        left: float | None = None
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RetryGaveUp(self.outage.describe())
        delay = self._backoff.next_delay()
        if left is not None:
            delay = min(delay, left)
        if self._stop is None:
            time.sleep(delay)
            return True
        return not self._stop.wait(delay)

    def succeeded(self) -> None:
        """For a loop that is more than one call: its attempt went through."""
        self._backoff.reset()
        self.outage.recovered()
