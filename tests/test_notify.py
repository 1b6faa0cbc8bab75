"""sd_notify without systemd: a bound AF_UNIX datagram socket stands in for NOTIFY_SOCKET.

systemd reads its notification socket when it gets around to it; until then the kernel queues
only a few datagrams (net.unix.max_dgram_qlen, 10 by default). Notifying must never wait for it:
the main loop sends from the same thread that acts on SIGTERM.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from whisperd.notify import Notifier

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """The stand-in for systemd's socket, and NOTIFY_SOCKET pointing at it."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield sock
    finally:
        sock.close()  # also wakes a sender still blocked on it (a regression), with ECONNREFUSED


def received(sock: socket.socket) -> list[str]:
    """Every datagram queued on `sock`, without waiting."""
    out = []
    while True:
        try:
            out.append(sock.recv(65536, socket.MSG_DONTWAIT).decode("utf-8"))
        except BlockingIOError:
            return out


def test_messages_arrive_as_utf8_datagrams(receiver: socket.socket) -> None:
    notifier = Notifier()
    notifier.ready("watching 会议.wav\nline two")
    notifier.status("idle")
    ready, status = received(receiver)
    assert ready.splitlines()[:2] == ["READY=1", "STATUS=watching 会议.wav line two"]
    assert status == "STATUS=idle"


def test_a_socket_nobody_reads_does_not_block_the_sender(receiver: socket.socket) -> None:
    notifier = Notifier()
    finished = threading.Event()

    def flood() -> None:
        for i in range(1000):
            notifier.status(f"{i} queued, 0 done, 0 failed")
        finished.set()

    start = time.monotonic()
    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    sender.join(5)
    elapsed = time.monotonic() - start
    assert finished.is_set(), "sending blocked on a full notification socket"
    assert elapsed < 1.0, f"1000 messages took {elapsed:.2f} s"
    # What fitted was delivered in order; the rest was dropped.
    kept = received(receiver)
    assert kept and kept[0] == "STATUS=0 queued, 0 done, 0 failed" and len(kept) < 1000
    # Once systemd reads again, messages get through again.
    notifier.stopping()
    assert received(receiver) == ["STOPPING=1\nSTATUS=stopping"]
