"""systemd's sd_notify protocol: READY, STATUS, WATCHDOG, RELOADING, STOPPING.

Does nothing when NOTIFY_SOCKET is unset (run by hand, or under a service manager without it).
The datagrams are sent here rather than through `sdnotify`, which encodes messages as Latin-1 and
silently drops any it cannot encode: a STATUS naming `会议.wav` would vanish, and with it a READY=1
sent in the same datagram, leaving systemd waiting for a reload that has finished.

The socket is non-blocking: the kernel queues only a few datagrams (net.unix.max_dgram_qlen) until
systemd reads them, and a blocking send would stall the main loop, SIGTERM handling included. A
message that does not fit is dropped; the next STATUS or WATCHDOG ping carries the news anyway.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, watchdog_seconds: float | None = None) -> None:
        self.address = notify_address()
        self.enabled = self.address is not None
        kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        self._socket = socket.socket(socket.AF_UNIX, kind) if self.enabled else None
        self.watchdog_interval = watchdog_interval()
        self.ping_seconds: float | None = None
        self.set_watchdog_seconds(watchdog_seconds)
        self._last_watchdog = 0.0

    def set_watchdog_seconds(self, seconds: float | None) -> None:
        """How often to ping: the config's `watchdog_seconds`, else half of systemd's interval.

        Never slower than half the interval (a later ping would get the service killed), and not
        at all when systemd set no watchdog for us (nobody listens).
        """
        if self.watchdog_interval is None:
            self.ping_seconds = None
            return
        half = self.watchdog_interval / 2
        self.ping_seconds = min(seconds, half) if seconds else half

    def send(self, *lines: str) -> None:
        """One datagram, UTF-8 as systemd expects, sent only if it fits now.

        Errors (EAGAIN: systemd's queue is full) are ignored: notifying must never stop or delay the work.
        """
        if self._socket is None or self.address is None:
            return
        try:
            self._socket.sendto("\n".join(lines).encode("utf-8", "replace"), self.address)
        except OSError:
            pass

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={one_line(status)}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={one_line(text)}")

    def reloading(self) -> None:
        self.send("RELOADING=1", "STATUS=reloading the configuration",
                  f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def seconds_to_next_ping(self) -> float | None:
        """How long the caller may sleep before `watchdog()` must run again (None: no watchdog).

        Sleeping a whole `ping_seconds` after a loop turn that did not ping would let the gap
        between pings grow to twice that, which is systemd's whole timeout.
        """
        if self.ping_seconds is None:
            return None
        return max(0.0, self._last_watchdog + self.ping_seconds - time.monotonic())

    def watchdog(self, force: bool = False) -> None:
        """Ping every `ping_seconds`; cheap to call from every loop turn."""
        if self.ping_seconds is None:
            return
        now = time.monotonic()
        if force or now - self._last_watchdog >= self.ping_seconds:
            self.send("WATCHDOG=1")
            self._last_watchdog = now


def watchdog_interval() -> float | None:
    """Seconds from WATCHDOG_USEC, if systemd set a watchdog for this very process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        seconds = int(usec) / 1_000_000
    except ValueError:
        return None
    return seconds if seconds > 0 else None


def one_line(text: str) -> str:
    """A file name with a newline in it must not end the STATUS= line and start another assignment."""
    return " ".join(text.splitlines())


def notify_address() -> str | bytes | None:
    """NOTIFY_SOCKET as a socket address: a path, or an abstract name (`@name`, a leading NUL)."""
    value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value
