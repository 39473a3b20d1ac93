"""systemd's notification protocol for ``Type=notify``: ``READY=1`` once every local consumer
is subscribed and registered (what ``/readyz`` reports), ``STOPPING=1`` when a graceful stop
starts, and ``STATUS=`` with the reason, shown by ``systemctl status``.

A message is one datagram to the Unix socket named by ``NOTIFY_SOCKET`` (a name starting with
``@`` is in the abstract namespace). That is a few lines, so no library: sdnotify, the
pure-Python one, has had no release since 2017, reads the environment itself and hides every
error. A failed send is logged once and never stops the daemon: systemd's timeouts decide.
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger(__name__)

# sun_path holds 108 bytes, the last a NUL for a path (an abstract name has a NUL first).
MAX_ADDRESS_BYTES = 107


def address_problem(address: str) -> str | None:
    """What is wrong with a NOTIFY_SOCKET value, or None (the empty value: not under systemd)."""
    if not address:
        return None
    if not address.startswith(("/", "@")):
        return f"{address!r} is neither a socket path (/...) nor an abstract socket name (@...)"
    if len(address.encode()) > MAX_ADDRESS_BYTES:
        return f"{address!r} is longer than a Unix socket address ({MAX_ADDRESS_BYTES} bytes)"
    return None


class Notifier:
    """Tells systemd how the daemon is doing; does nothing without a NOTIFY_SOCKET."""

    def __init__(self, address: str) -> None:
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._shown = address
        self._socket: socket.socket | None = None
        self._ready = False
        self._status = ""
        self._failed = False

    def update(self, readiness: tuple[bool, str]) -> None:
        """Once per supervisor loop: READY=1 the first time the local group is ready, and the
        status whenever its reason changes."""
        ready, why = readiness
        lines = [] if why == self._status else [f"STATUS={why}"]
        self._status = why
        if ready and not self._ready:
            self._ready = True
            lines.insert(0, "READY=1")
        if lines:
            self._send("\n".join(lines))

    def stopping(self, why: str = "stopping: the consumers flush and leave") -> None:
        """A graceful stop starts: the last message this daemon sends."""
        self._send(f"STOPPING=1\nSTATUS={why}")
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._address = ""

    def declined(self, why: str) -> None:
        """The daemon exits 0 without starting (the group is stopped). Exiting before READY=1
        would be a failed start to systemd (result 'protocol'), restarted by
        Restart=on-failure; started and stopped, it is a clean exit, as without systemd."""
        self._send("READY=1")
        self.stopping(why)

    def _send(self, message: str) -> None:
        if not self._address:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.sendto(message.encode(), self._address)
        except OSError as error:
            if not self._failed:
                self._failed = True
                log.warning(
                    "systemd notification to NOTIFY_SOCKET=%s failed (%s); later failures are "
                    "not logged",
                    self._shown,
                    error,
                )
