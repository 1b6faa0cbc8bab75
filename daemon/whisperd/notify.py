"""systemd's sd_notify protocol: READY, STATUS, WATCHDOG, RELOADING, STOPPING.

Does nothing when NOTIFY_SOCKET is unset (run by hand, or under a service manager without it).
"""

from __future__ import annotations

import os
import time

import sdnotify


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        self.watchdog_interval = watchdog_interval()
        self._last_watchdog = 0.0

    def send(self, *lines: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(lines))

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def watchdog(self, force: bool = False) -> None:
        """Ping at half the interval systemd asked for; cheap to call from every loop turn."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if force or now - self._last_watchdog >= self.watchdog_interval / 2:
            self.send("WATCHDOG=1")
            self._last_watchdog = now


def watchdog_interval() -> float | None:
    """Seconds from WATCHDOG_USEC, if systemd set a watchdog for this very process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1_000_000
    except ValueError:
        return None
