"""The exceptions processor raises on purpose, and the exit codes of its entry points; anything
else is a bug."""

from __future__ import annotations

import enum

import redis


class ExitCode(enum.IntEnum):
    """What an entry point of processor (the daemon, a consumer process, a command) exits with.

    Several share a value: each entry point tells its own failures apart from success, and
    their meanings do not overlap within one entry point.
    """

    OK = 0
    # ``status``, ``publish``, ``scale``, ``stop``, ``start``: Redis was unreachable or refused
    # the command.
    UNREACHABLE = 1
    # A consumer process whose thread died, or that stopped with messages it counted lost; the
    # daemon when one of its consumers failed to stop or stopped so.
    CONSUMER_ERROR = 1
    # Any entry point stopped by a wrong setting; ``status``, ``dead-letters`` and ``replay``
    # also when a key they read holds another type than the daemon (or replay) writes there.
    CONFIG = 2
    # The daemon after a second SIGINT or SIGTERM killed its consumers.
    FORCED = 3
    # The daemon that gave up waiting for Redis at start-up (STARTUP_TIMEOUT).
    STARTUP_TIMEOUT = 4
    # ``status``: Redis answered, and no consumer of the group is live. Not 1, so a check can
    # tell a group that is down from a Redis it could not reach.
    NO_CONSUMER = 5
    # ``replay``: not every chosen dead letter was replayed, or none was (no live consumer).
    NOT_REPLAYED = 6
    # ``replay`` stopped by SIGINT or SIGTERM between two dead letters: 128 + the signal's
    # number, as a shell reports a command a signal ended.
    INTERRUPTED = 130
    TERMINATED = 143


class ProcessorError(Exception):
    """Base class of every error processor raises deliberately."""


class ConfigError(ProcessorError):
    """Raised when a setting has a wrong value, from a flag, the environment or the file."""


class StartupTimeout(ProcessorError):
    """Raised when Redis was not reachable within ``startup_timeout_s`` of the daemon's start."""


class HandlerLoadError(ConfigError):
    """Raised when the ``--handler`` target cannot be imported or is not callable."""


class HandlerTimeout(ProcessorError):
    """Raised inside a handler call that ran past ``handler_timeout_s``."""


class ConsumerFailed(ProcessorError):
    """Raised by ``Consumer.run`` after one of its threads died of an unexpected error.

    The consumer has left the group by then (the others take over its share); its process
    exits non-zero so the supervisor replaces it.
    """


class RetryStopped(ProcessorError):
    """Raised by ``Retrier.call`` when its stop event was set while it backed off."""


class RetryGaveUp(ProcessorError):
    """Raised by ``Retrier.call`` when an attempt failed at or past the deadline it was given,
    or when its ``on_error`` hook decided that no more attempts are made."""


class WriterGone(ProcessorError):
    """Raised by ``WriteThread.submit`` once the write thread has died."""


class GroupStopped(ProcessorError):
    """Raised by ``Steering.start`` when the group is asked to stop (the stop key is set)."""


class WritesRefused(redis.ResponseError):
    """Raised when Redis refuses writes for a while: a failed save with
    ``stop-writes-on-bgsave-error`` (MISCONF), fewer replicas than ``min-replicas-to-write``
    (NOREPLICAS), another client's script past ``busy-reply-threshold`` (BUSY).

    redis-py raises it for those replies once :mod:`processor.store.connection` has registered
    it with the reply parser."""


class WrongType(redis.ResponseError):
    """Raised when a key the daemon writes holds another type of value (WRONGTYPE): someone
    else's key under one of our names, set while the daemon runs. The write script checks its
    keys' types before its first write and replies WRONGTYPE naming the key, so a batch is never
    half-written; the batch is held and retried until the key is deleted or renamed.

    Registered with redis-py's reply parser by :mod:`processor.store.connection`."""


class NotACount(WrongType):
    """Raised when a counter's field holds something else than an integer (an operator's
    HSET), where a counter is read: the message names the hash and the field."""

    def problem(self) -> str:
        """As the start-up check words a wrong key."""
        return f"invalid KEY_PREFIX: {str(self).removeprefix('WRONGTYPE ')}"


class FeedEnded(ConnectionError):
    """Raised by a fed consumer's feed when its reader goes silent, refuses it, or closes the
    feed: the consumer moves to another reader and reports a gap."""
