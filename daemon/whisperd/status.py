"""`whisperd status`: read the job store and the daemon's status file; works whether the daemon runs or not.

Everything about jobs is read through the job store, so with a shared (PostgreSQL) store the counts
are the whole cluster's and each running job names the host that runs it.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from whisperd.jobstore import Job, JobStore, JobStoreError, SqliteJobStore, read_host_id

STATUS_FILE = "daemon.json"
STATUS_REFRESH_SECONDS = 15.0  # the daemon rewrites its status file at least this often while it runs


@dataclass(frozen=True, slots=True)
class JobProgressEstimate:
    """The running job's progress as the worker last reported it, and when it should end at the
    rate it has gone since the job started (file checks, speech scan and model time included)."""

    position_seconds: float
    duration_seconds: float
    elapsed_seconds: float

    @property
    def percent(self) -> float:
        if self.duration_seconds <= 0:
            return 0.0
        return min(100.0, 100.0 * self.position_seconds / self.duration_seconds)

    @property
    def eta_seconds(self) -> float | None:
        """None until there is a rate to go by (nothing decoded yet)."""
        if self.position_seconds <= 0 or self.elapsed_seconds <= 0:
            return None
        rate = self.position_seconds / self.elapsed_seconds
        return max(0.0, self.duration_seconds - self.position_seconds) / rate

    def to_dict(self) -> dict[str, float | None]:
        eta = self.eta_seconds
        return {"percent": round(self.percent, 1), "eta_seconds": None if eta is None else round(eta, 1),
                "position_seconds": round(self.position_seconds, 1),
                "duration_seconds": round(self.duration_seconds, 1)}


def format_eta(seconds: float) -> str:
    """`45s`, `1m10s`, `2h05m`: short enough for systemd's STATUS= and one status line."""
    whole = math.ceil(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def progress_parts(progress: dict[str, Any]) -> list[str]:
    """`["42%", "eta 1m10s"]` from a progress record (`JobProgressEstimate.to_dict`); floored, so a job
    shows 100% only once it is through."""
    parts = [f"{math.floor(progress['percent'])}%"]
    if progress.get("eta_seconds") is not None:
        parts.append(f"eta {format_eta(progress['eta_seconds'])}")
    return parts


@dataclass(frozen=True, slots=True)
class DaemonStatus:
    """What a running daemon says about itself in `daemon.json`; written by the daemon, read by `status`."""

    pid: int
    started_at: float = 0.0
    updated_at: float = 0.0
    ready: bool = False
    worker_pid: int | None = None
    worker_starts: int = 0
    engine: dict[str, Any] | None = None
    current_job: dict[str, Any] | None = None  # {"id", "path", "progress"}: progress from JobProgressEstimate.to_dict
    running_jobs: list[dict[str, Any]] = field(default_factory=list)  # every job in the worker, current_job first
    inboxes: list[str] = field(default_factory=list)
    stopping: bool = False
    unrecognised_files: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    host_id: str | None = None
    job_store: str | None = None  # where the jobs are (no password)
    job_store_down_since: float | None = None  # epoch seconds; None while the database is reachable

    def to_json(self) -> str:
        # ensure_ascii: a name that is not UTF-8 is kept as an escape, never an encoding error.
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> DaemonStatus:
        """Tolerant of keys added or dropped by other versions of whisperd."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


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
        "wall_seconds": job.wall_seconds, "finished_at": job.finished_at, "host": job.owner,
        "lease_expires": job.lease_expires,
    }


def _with_progress(job: dict[str, Any], daemon: dict[str, Any] | None) -> dict[str, Any]:
    """A running job with its progress when it is this host's live daemon's job (other hosts'
    jobs, and a dead daemon's last report, have none)."""
    alive = bool(daemon and daemon.get("alive"))
    reported = (daemon.get("running_jobs") or [daemon.get("current_job")]) if daemon and alive else []
    progress = next((r.get("progress") for r in reported if isinstance(r, dict) and r.get("id") == job["id"]), None)
    return {**job, "progress": progress}


def _read_daemon_file(state_dir: Path) -> dict[str, Any] | None:
    status_file = state_dir / STATUS_FILE
    try:
        status = DaemonStatus.from_json(status_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        return {"pid": None, "alive": False, "error": f"{status_file}: {exc}"}
    return {**asdict(status), "alive": bool(status.pid) and pid_alive(int(status.pid))}


def collect_status(state_dir: Path, failures: int = 10, recent: int = 10,
                   open_store: Callable[[], JobStore] | None = None) -> dict[str, Any]:
    """Daemon liveness (from its status file) and the queue (from the job store), as plain data.

    `open_store` opens the configured store; without it, the SQLite file in `state_dir` is read
    if there is one. `recent` lists the last jobs done, with their attempts: after a retry, that
    is where one sees that the job finished and how many tries it took.
    """
    report: dict[str, Any] = {"state_dir": str(state_dir), "daemon": _read_daemon_file(state_dir),
                              "host_id": read_host_id(state_dir), "job_store": None, "counts": {},
                              "running": [], "failures": [], "recent": [], "hook_failures": [],
                              "error": None}
    if open_store is None:
        db = state_dir / "jobs.sqlite3"
        if not db.exists():
            return report
        def open_store() -> JobStore:
            return SqliteJobStore(db, host_id=report["host_id"] or "status")
    try:
        store = open_store()
        report["job_store"] = store.location
    except (sqlite3.Error, JobStoreError, OSError) as exc:
        report["error"] = f"cannot open the job database: {exc}"
        return report
    try:
        report["counts"] = store.counts()
        report["running"] = [_with_progress(_job_summary(j), report["daemon"]) for j in store.running()]
        report["failures"] = [_job_summary(j) for j in store.recent_failures(failures)]
        report["recent"] = [_job_summary(j) for j in store.recent_done(recent)] if recent > 0 else []
        report["hook_failures"] = [
            {"id": d.id, "hook": d.hook, "job_id": d.job_id, "event": d.payload.get("event"),
             "path": d.payload.get("audio_path"), "attempts": d.attempts, "error": d.last_error,
             "finished_at": d.finished_at} for d in store.failed_deliveries(failures)]
    except (sqlite3.Error, JobStoreError) as exc:
        report["error"] = f"cannot read the job database {store.location}: {exc}"
    finally:
        store.close()
    return report


def shown(path: object) -> str:
    """A path as text a terminal can show: bytes that are not UTF-8 appear as `\\xNN`, a newline as `\\n`."""
    text = os.fsencode(str(path)).decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n").replace("\r", "\\r")


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
    elif daemon.get("error"):
        lines.append(f"daemon: unknown ({daemon['error']})")
    elif not daemon["alive"]:
        lines.append(f"daemon: not running (last pid {daemon['pid']}, last update {_ago(daemon.get('updated_at'))})")
    else:
        engine = daemon.get("engine") or {}
        ready = "ready" if daemon.get("ready") else "loading model"
        lines.append(f"daemon: running, pid {daemon['pid']}, {ready}, worker pid {daemon.get('worker_pid')}, "
                     f"model {engine.get('model', '?')} on {engine.get('device', '?')} "
                     f"({engine.get('backend', '?')}, {engine.get('precision', '?')})")
        updated = daemon.get("updated_at") or 0
        if time.time() - updated > 4 * STATUS_REFRESH_SECONDS:
            lines.append(f"warning: the daemon last updated its status {_ago(updated)}; it may be stuck")
        if daemon.get("job_store_down_since"):
            lines.append(f"warning: the job database is unavailable since {_ago(daemon['job_store_down_since'])}; "
                         "the daemon keeps retrying")
    shared = str(report.get("job_store") or "").startswith("postgresql")
    if shared:
        lines.append(f"job store: {report['job_store']} (shared by every host); this host: {report.get('host_id')}")
    if report.get("error"):
        lines.append(f"error: {report['error']}")
    counts = report["counts"]
    lines.append(("jobs (all hosts): " if shared else "jobs: ")
                 + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("queued", "running", "done", "failed", "superseded")))
    for job in report["running"]:
        host = f", host {job['host']}" if shared and job.get("host") else ""
        progress = "".join(f", {part}" for part in progress_parts(job["progress"])) if job.get("progress") else ""
        lines.append(f"running: {shown(job['path'])} (attempt {job['attempts'] + 1}{host}{progress})")
    if report.get("recent"):
        lines.append("recently done:")
        for job in report["recent"]:
            lines.append(f"  {shown(job['path'])} ({_ago(job['finished_at'])}, {_done_detail(job)})")
    unrecognised = (daemon or {}).get("unrecognised_files") if daemon and daemon.get("alive") else None
    if unrecognised:
        lines.append("not taken as recordings (rename them to transcribe them):")
        for item in unrecognised:
            lines.append(f"  {shown(item['path'])}: {item['reason']}")
    if report["failures"]:
        lines.append("recent failures:")
        for job in report["failures"]:
            lines.append(f"  {shown(job['path'])} ({_ago(job['finished_at'])}, attempts {job['attempts']}): "
                         f"{shown(job['error'])}")
    if report.get("hook_failures"):
        lines.append("completion hooks that failed:")
        for item in report["hook_failures"]:
            lines.append(f"  {item['hook']} for {shown(item['path'])} ({item['event']}, {_ago(item['finished_at'])}, "
                         f"attempts {item['attempts']}): {item['error']}")
    return "\n".join(lines)


def _done_detail(job: dict[str, Any]) -> str:
    """`12.3 s audio in 4.1 s, attempts 2 (1 failed: <why>)`: a retried job says why it needed one."""
    audio, wall = job.get("audio_seconds"), job.get("wall_seconds")
    speed = f"{audio:.1f} s audio in {wall:.1f} s" if audio is not None and wall is not None else "done"
    failed = job["attempts"]
    if not failed:
        return f"{speed}, attempts 1"
    return f"{speed}, attempts {failed + 1} ({failed} failed: {job['error']})"
