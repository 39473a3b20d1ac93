"""The exceptions processor raises on purpose; anything else is a bug."""

from __future__ import annotations


class ProcessorError(Exception):
    """Base class of every error processor raises deliberately."""


class ConfigError(ProcessorError):
    """Raised when a setting has a wrong value, from a flag, the environment or the file."""


class HandlerLoadError(ConfigError):
    """Raised when the ``--handler`` target cannot be imported or is not callable."""


class RedisUnavailable(ProcessorError):
    """Raised when Redis cannot be reached within the time we were allowed to wait."""


class HandlerTimeout(ProcessorError):
    """Raised inside a handler call that ran past ``handler_timeout_s``."""
