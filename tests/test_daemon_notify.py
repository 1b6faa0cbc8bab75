"""The daemon under a (stand-in) systemd: sd_notify messages, SIGHUP reload and SIGTERM stop.

A bound AF_UNIX datagram socket plays systemd's NOTIFY_SOCKET, and WATCHDOG_USEC asks for a
2 s watchdog (WATCHDOG_PID is left unset: systemd sets it only for the main pid it forked).
The tests share one daemon and run in order; the last one stops it.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon_harness import (
    TEMP_OUTPUT_GLOB,
    DaemonProcess,
    NotifySocket,
    clip,
    final_row,
    gone,
    long_recording,
    rows_for,
    wait_for,
    whisperd_cli,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

WATCHDOG_USEC = 2_000_000
STOP_TIMEOUT = 2.0
QUEUE_STATUS = re.compile(r"\d+ queued, (\d+) done, \d+ failed")
PROGRESS_STATUS = re.compile(r"^transcribing progress\.wav: (\d+)% \(eta (\d+m)?\d+s\); ")


@dataclass
class Supervised:
    daemon: DaemonProcess
    notify: NotifySocket
    root: Path
    config: Path
    state: Path


def config_for(root: Path, inboxes: list[str]) -> Path:
    return write_config(root / "whisperd.yaml", [{"path": p} for p in inboxes], root / "state",
                        stop_timeout_seconds=STOP_TIMEOUT)


@pytest.fixture(scope="module")
def supervised(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervised]:
    root = tmp_path_factory.mktemp("notify")
    (root / "inbox").mkdir()
    config = config_for(root, ["inbox"])
    notify = NotifySocket(root / "notify.sock")
    daemon = DaemonProcess(config, root / "daemon.log",
                           env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}).start()
    try:
        yield Supervised(daemon, notify, root, config, root / "state")
    finally:
        daemon.kill_all()
        notify.close()


def test_ready_status_and_watchdog(supervised: Supervised) -> None:
    notify, daemon = supervised.notify, supervised.daemon
    ready_at, ready = notify.wait_for("READY", "1", timeout=240)
    assert daemon.wait_event("worker ready", timeout=10), "READY=1 only once the model is loaded"
    loading = notify.with_key("STATUS", "loading model")
    assert loading and loading[0][0] < ready_at
    assert ready["MAINPID"] == str(daemon.pid)
    assert QUEUE_STATUS.search(ready["STATUS"]), ready["STATUS"]

    # WATCHDOG=1 keeps coming, at about half of WATCHDOG_USEC.
    notify.wait_for("WATCHDOG", "1", count=4, after=ready_at, timeout=30)

    # A job shows in STATUS while it runs, and the queue counts follow.
    target = supervised.root / "inbox" / "status.wav"
    shutil.copyfile(clip("en_goforward").path, target)
    notify.wait_for("STATUS", "transcribing status.wav; 0 queued, 0 done, 0 failed", timeout=60)
    assert final_row(supervised.state, target).state == "done"
    wait_for(lambda: "1" in (done_count(m["STATUS"]) for _, m in notify.with_key("STATUS")), 30, "STATUS with 1 done")
    # Still pinging after the job, and never a gap that would make systemd kill the service.
    notify.wait_for("WATCHDOG", "1", after=time.monotonic(), timeout=5)
    pings = [t for t, _ in notify.with_key("WATCHDOG", "1") if t >= ready_at]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    print(f"watchdog pings: {len(pings)}, gaps {min(gaps):.2f}..{max(gaps):.2f} s")
    # About half the interval (systemd kills the service at a whole one), with slack for a busy machine.
    assert 0.5 < min(gaps) and max(gaps) < 0.75 * WATCHDOG_USEC / 1e6, gaps


def done_count(status: str) -> str | None:
    match = QUEUE_STATUS.search(status)
    return match.group(1) if match else None


def test_sighup_reloads_and_a_new_inbox_works(supervised: Supervised) -> None:
    notify, daemon = supervised.notify, supervised.daemon
    notify.wait_for("READY", "1", timeout=240)
    second = supervised.root / "inbox2"
    second.mkdir()
    config_for(supervised.root, ["inbox", "inbox2"])
    before = time.monotonic()
    daemon.send(signal.SIGHUP)
    reloading_at, _ = notify.wait_for("RELOADING", "1", after=before, timeout=30)
    ready_at, _ = notify.wait_for("READY", "1", after=reloading_at, timeout=30)
    assert reloading_at <= ready_at
    reloaded = daemon.wait_event("configuration reloaded", timeout=10)
    assert str(second) in reloaded["inboxes"]
    target = second / "new_inbox.wav"
    shutil.copyfile(clip("en_goforward").path, target)
    assert final_row(supervised.state, target).state == "done"
    assert target.with_suffix(".txt").is_file()
    assert len(daemon.named("worker ready")) == 1, "an inbox change must not reload the model"


def running_progress(config: Path) -> tuple[float | None, str]:
    """The running job's percentage from `whisperd status --json`, and the text status' running line."""
    report = whisperd_cli("status", "--config", str(config), "--json")
    assert report.returncode == 0, report.stderr
    running = json.loads(report.stdout)["running"]
    percent = running[0]["progress"]["percent"] if running and running[0]["progress"] else None
    text = whisperd_cli("status", "--config", str(config)).stdout
    return percent, next((line for line in text.splitlines() if line.startswith("running: ")), "")


def test_a_long_job_shows_its_progress_in_status_and_in_systemd_status(supervised: Supervised) -> None:
    notify, daemon = supervised.notify, supervised.daemon
    target = supervised.root / "inbox" / "progress.wav"
    shutil.copyfile(long_recording().path, target)  # ten minutes: several status reads while it runs
    daemon.wait_event("job started", path=str(target))
    percents: list[float] = []
    lines: list[str] = []
    deadline = time.monotonic() + 300
    while not any(row.state in ("done", "failed") for row in rows_for(supervised.state, target)):
        assert time.monotonic() < deadline, "the long job did not finish"
        percent, line = running_progress(supervised.config)
        if percent is not None and 0 < percent < 100:
            percents.append(percent)
            lines.append(line)
    assert final_row(supervised.state, target).state == "done"
    print(f"progress seen by whisperd status: {percents}")
    assert len(set(percents)) >= 2 and percents == sorted(percents), percents
    assert any(re.search(r"\(attempt 1, \d+%, eta \d", line) for line in lines), lines
    shown = [int(m.group(1)) for _, msg in notify.with_key("STATUS") if (m := PROGRESS_STATUS.match(msg["STATUS"]))]
    assert len(set(shown)) >= 3 and shown == sorted(shown) and 0 <= shown[0] < shown[-1] <= 100, shown
    after = daemon.status_file()["current_job"]
    assert after is None or after["path"] != str(target), "a finished job leaves daemon.json"


def test_sigterm_during_a_long_job_requeues_it_and_exits_cleanly(supervised: Supervised) -> None:
    notify, daemon = supervised.notify, supervised.daemon
    target = supervised.root / "inbox" / "long.wav"
    shutil.copyfile(long_recording().path, target)  # ten minutes: still running when SIGTERM comes
    daemon.wait_event("job started", path=str(target))
    worker = daemon.status_file()["worker_pid"]
    time.sleep(0.5)
    stop_sent = time.monotonic()
    daemon.send(signal.SIGTERM)
    code = daemon.wait_exit(STOP_TIMEOUT + 30)
    took = time.monotonic() - stop_sent
    print(f"SIGTERM to exit: {took:.1f} s (stop_timeout_seconds {STOP_TIMEOUT})")
    assert code == 0
    assert took < STOP_TIMEOUT + 5
    assert notify.with_key("STOPPING", "1")
    [row] = rows_for(supervised.state, target)
    assert row.state == "queued", "the interrupted job goes back to the queue"
    assert row.attempts == 0, "a clean stop does not use up a retry"
    assert daemon.named("job requeued", path=str(target))
    assert not target.with_suffix(".txt").exists()
    assert not list(target.parent.glob(TEMP_OUTPUT_GLOB))
    assert gone([worker])
