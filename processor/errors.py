"""The exceptions processor raises on purpose; anything else is a bug."""

from __future__ import annotations

# Exit code of an entry point stopped by a wrong setting.
EXIT_CONFIG = 2
# Exit code of the daemon that gave up waiting for Redis at start-up (STARTUP_TIMEOUT).
EXIT_STARTUP_TIMEOUT = 4


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
