"""Crashes: the daemon SIGKILLed mid-job, and the worker SIGKILLed mid-job.

Each test starts its own daemon(s): what is checked is precisely what happens across a process
dying, so nothing can be shared.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest

from daemon_harness import (
    TEMP_OUTPUT_GLOB,
    clip,
    final_row,
    gone,
    long_recording,
    rows_for,
    running_daemon,
    transcript_error,
    wait_for,
    whisperd_cli,
    write_config,
)
from whisperd.naming import TEMP_PREFIX, temp_tag

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]



def make_setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    return write_config(tmp_path / "whisperd.yaml", [{"path": "inbox"}], state), inbox, state


def test_daemon_sigkilled_mid_job_resumes_exactly_once(tmp_path: Path) -> None:
    config, inbox, state = make_setup(tmp_path)
    first = inbox / "first.wav"
    long = inbox / "long.wav"
    with running_daemon(config, tmp_path / "run1.log") as run1:
        shutil.copyfile(clip("en_goforward").path, first)
        assert final_row(state, first).state == "done"
        recording = long_recording()  # 10 minutes: long enough to be killed in the middle
        shutil.copyfile(recording.path, long)
        run1.wait_event("job started", path=str(long))
        time.sleep(1.0)  # into the inference
        family = [p.pid for p in run1.family()]
        worker_pid = run1.status_file()["worker_pid"]
        assert worker_pid in family and len(family) >= 2
        assert psutil.Process(worker_pid).name() == "whisperd-worker"
        run1.send(signal.SIGKILL)  # the daemon only: its worker must follow by itself
        run1.wait_exit(10)
        wait_for(lambda: gone(family), 15, "the worker (and every other child) to die with the daemon")
        assert [r.state for r in rows_for(state, long)] == ["running"]
        assert not run1.named("job done", path=str(long))
    # What a worker killed while writing leaves behind: the next attempt must clear it.
    stale = inbox / f"{TEMP_PREFIX}{temp_tag(long.with_suffix('.txt'))}.{worker_pid}.k1ll3d"
    stale.write_text("half a transcr")

    with running_daemon(config, tmp_path / "run2.log") as run2:
        assert run2.named("daemon starting")[0]["requeued_after_crash"] == 1
        row = final_row(state, long, timeout=600)
        run2.wait_event("job done", path=str(long), timeout=30)
        assert row.state == "done", row.last_error
        assert row.attempts == 1, "the crashed attempt counts (it may have been the file's fault)"
        assert [r.state for r in rows_for(state, long)] == ["done"]
        assert len(run2.named("job done", path=str(long))) == 1
        assert not run2.named("job started", path=str(first)), "a finished file was redone"
        assert [r.state for r in rows_for(state, first)] == ["done"]
        assert not list(inbox.glob(TEMP_OUTPUT_GLOB)), "temp outputs left behind"
        error = transcript_error(recording, long.with_suffix(".txt"))
        print(f"long recording after the restart: WER {error:.3f}")
        assert error <= 0.2
        run2.send(signal.SIGTERM)
        assert run2.wait_exit(60) == 0

    # `whisperd status` after the daemon stopped: it says so, and still reads the queue.
    out = whisperd_cli("status", "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert f"daemon: not running (last pid {run2.pid}" in out.stdout
    assert "jobs: 0 queued, 0 running, 2 done, 0 failed" in out.stdout
    report = json.loads(whisperd_cli("status", "--config", str(config), "--json").stdout)
    assert report["daemon"]["alive"] is False and report["counts"]["done"] == 2
    assert {Path(j["path"]).name for j in report["recent"]} == {"first.wav", "long.wav"}


def test_worker_sigkilled_mid_job_is_retried_and_succeeds(tmp_path: Path) -> None:
    config, inbox, state = make_setup(tmp_path)
    source = long_recording()
    target = inbox / "meeting.wav"
    with running_daemon(config, tmp_path / "daemon.log") as daemon:
        shutil.copyfile(source.path, target)
        daemon.wait_event("job started", path=str(target))
        time.sleep(0.5)
        first_worker = daemon.status_file()["worker_pid"]
        os.kill(first_worker, signal.SIGKILL)
        lost = daemon.wait_event("worker lost", timeout=30)
        assert lost["reason"] == "crashed" and lost["worker_pid"] == first_worker
        retry = daemon.wait_event("job will be retried", timeout=30, path=str(target))
        assert retry["attempt"] == 1
        row = final_row(state, target, timeout=600)
        daemon.wait_event("job done", path=str(target), timeout=30)
        daemon.check_alive("after the worker was killed")
        assert row.state == "done", row.last_error
        assert row.attempts == 1 and "worker process died" in (row.last_error or "")
        second_worker = daemon.wait_event("worker ready", count=2)["worker_pid"]
        assert second_worker != first_worker and gone([first_worker])
        assert row.worker_pid == row.extra["worker_pid"] == second_worker
        assert daemon.status_file()["worker_pid"] == second_worker
        assert transcript_error(source, target.with_suffix(".txt")) <= 0.2
        assert not list(inbox.glob(TEMP_OUTPUT_GLOB))

        out = whisperd_cli("status", "--config", str(config))
        assert out.returncode == 0, out.stderr
        assert f"worker pid {second_worker}" in out.stdout
        assert "recently done:" in out.stdout
        line = next(text for text in out.stdout.splitlines() if str(target) in text)
        assert "attempts 2 (1 failed: the worker process died during the job" in line, line
        report = json.loads(whisperd_cli("status", "--config", str(config), "--json").stdout)
        recent = report["recent"][0]
        assert (recent["path"], recent["state"], recent["attempts"]) == (str(target), "done", 1)
