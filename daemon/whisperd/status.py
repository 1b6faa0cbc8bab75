"""`whisperd status`: read the job store and the daemon's status file; works whether the daemon runs or not."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from whisperd.jobstore import Job, JobStore

STATUS_FILE = "daemon.json"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _job_summary(job: Job) -> dict[str, Any]:
    return {
        "id": job.id, "path": str(job.path), "state": job.state, "attempts": job.attempts,
        "error": job.last_error, "language": job.language, "audio_seconds": job.audio_seconds,
        "wall_seconds": job.wall_seconds, "finished_at": job.finished_at,
    }


def collect_status(state_dir: Path, failures: int = 10) -> dict[str, Any]:
    db = state_dir / "jobs.sqlite3"
    report: dict[str, Any] = {"state_dir": str(state_dir), "daemon": None, "counts": {}, "running": [], "failures": []}
    status_file = state_dir / STATUS_FILE
    if status_file.exists():
        daemon = json.loads(status_file.read_text())
        daemon["alive"] = pid_alive(int(daemon["pid"]))
        report["daemon"] = daemon
    if db.exists():
        store = JobStore(db)
        try:
            report["counts"] = store.counts()
            report["running"] = [_job_summary(j) for j in store.running()]
            report["failures"] = [_job_summary(j) for j in store.recent_failures(failures)]
        finally:
            store.close()
    return report


def _ago(ts: float | None) -> str:
    if not ts:
        return "?"
    secs = max(0, int(time.time() - ts))
    return f"{secs // 3600}h{secs % 3600 // 60:02d}m ago" if secs >= 3600 else f"{secs // 60}m{secs % 60:02d}s ago"


def format_status(report: dict[str, Any]) -> str:
    lines = [f"state directory: {report['state_dir']}"]
    daemon = report["daemon"]
    if daemon is None:
        lines.append("daemon: never started here")
    elif not daemon["alive"]:
        lines.append(f"daemon: not running (last pid {daemon['pid']}, last update {_ago(daemon['updated_at'])})")
    else:
        engine = daemon.get("engine") or {}
        ready = "ready" if daemon.get("ready") else "loading model"
        lines.append(f"daemon: running, pid {daemon['pid']}, {ready}, worker pid {daemon.get('worker_pid')}, "
                     f"model {engine.get('model', '?')} on {engine.get('device', '?')} ({engine.get('precision', '?')})")
    counts = report["counts"]
    lines.append("jobs: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("queued", "running", "done", "failed", "superseded")))
    for job in report["running"]:
        lines.append(f"running: {job['path']} (attempt {job['attempts'] + 1})")
    if report["failures"]:
        lines.append("recent failures:")
        for job in report["failures"]:
            lines.append(f"  {job['path']} ({_ago(job['finished_at'])}, {job['attempts']} attempts): {job['error']}")
    return "\n".join(lines)
