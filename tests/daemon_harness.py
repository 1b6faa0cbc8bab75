"""Shared pieces for the end-to-end daemon tests.

The daemon runs as users run it: `python -m whisperd run` in its own session, with the real
whisper-base model and real speech clips. Tests observe it only from outside, through its JSON
log lines on stdout, the job database, the files it writes and `whisperd status`, and wait with
deadlines (never fixed sleeps) because timings on a shared 2-core machine vary a lot.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import av
import numpy as np
import psutil
import yaml

from whisperd.audio import decode_audio
from whisperd_support.evaluation import DevClip, error_rate, fetch_clip

MODEL = "openai/whisper-base"
# The daemon tests run what a user gets by default: backend auto, precision auto (OpenVINO int8 on the
# CPU). WHISPERD_TEST_BACKEND=transformers WHISPERD_TEST_PRECISION=sym_int4 runs them on ipex-llm instead.
BACKEND = os.environ.get("WHISPERD_TEST_BACKEND", "auto")
PRECISION = os.environ.get("WHISPERD_TEST_PRECISION", "auto")
SETTLE_SECONDS = 0.5
RESCAN_SECONDS = 2.0
READY_TIMEOUT = 240.0  # interpreter start + model load, on a busy machine
JOB_TIMEOUT = 300.0  # one short clip, allowing for a machine shared with other test runs
TEMP_OUTPUT_GLOB = ".whisperd-tmp.*"
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")

T = TypeVar("T")


# -- waiting ------------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll until `predicate()` is truthy and return it; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# -- audio --------------------------------------------------------------------------------------


def clip(clip_id: str) -> DevClip:
    return fetch_clip(clip_id)


def encode(source: Path, target: Path, codec: str, rate: int = 44100) -> Path:
    """Re-encode a clip with PyAV (`aac` for .m4a, `libmp3lame` for .mp3), stereo like a phone records."""
    audio = decode_audio(source, sampling_rate=rate)
    stereo = np.ascontiguousarray(np.stack([audio, audio]))
    with av.open(str(target), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(stereo, format="fltp", layout="stereo")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return target


@dataclass(frozen=True)
class LongRecording:
    path: Path
    reference: str
    language: str = "en"


def long_recording() -> LongRecording:
    """Ten minutes of meeting (the speed benchmark's 600 s build): long enough to stop or kill a job
    in the middle on any backend (OpenVINO int8 needs ~11 s for it on 2 cores, a dev clip < 2 s)."""
    from whisperd_support.evaluation.meeting import Meeting, meeting_path

    path = meeting_path(seed=1, target_seconds=600)
    return LongRecording(path, Meeting.load(path).reference)


def transcript_error(c: DevClip | LongRecording, txt: Path) -> float:
    """Normalised WER (CER for zh/ja) of an output .txt against the recording's reference."""
    return error_rate([c.reference], [txt.read_text(encoding="utf-8")], c.language)


def write_slowly(target: Path, data: bytes, chunks: int, pause: float) -> float:
    """Write `data` in `chunks` pieces with `pause` seconds between them, keeping the file open
    throughout (as a recorder or a slow copy does). Returns the time.time() of the close."""
    size = -(-len(data) // chunks)
    with open(target, "wb") as fh:
        for start in range(0, len(data), size):
            fh.write(data[start:start + size])
            fh.flush()
            os.fsync(fh.fileno())
            if start + size < len(data):
                time.sleep(pause)
    return time.time()


# -- configuration ------------------------------------------------------------------------------


def write_config(path: Path, inboxes: list[dict[str, Any]], state_dir: Path, **settings: Any) -> Path:
    """A daemon config with short settle and rescan windows; `settings` override any key."""
    config: dict[str, Any] = {
        "inboxes": inboxes,
        "state_dir": str(state_dir),
        "settle_seconds": SETTLE_SECONDS,
        "rescan_seconds": RESCAN_SECONDS,
        "stop_timeout_seconds": 30,
        "log_format": "json",
        "log_level": "info",
        "engine": {"backend": BACKEND, "model": MODEL, "device": "cpu", "precision": PRECISION},
        "jobs": {"max_attempts": 3, "retry_backoff_seconds": 0.5, "timeout_base_seconds": 300,
                 "timeout_per_audio_second": 10},
    }
    for key, value in settings.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def write_rules(folder: Path, **rules: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rule_file = folder / ".whisperd.yaml"
    rule_file.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    return rule_file


# -- the job database (read-only, as an outside observer) ----------------------------------------


@dataclass(frozen=True)
class Row:
    id: int
    path: Path
    size: int
    state: str
    attempts: int
    last_error: str | None
    language: str | None
    worker_pid: int | None
    enqueued_at: float
    started_at: float | None
    finished_at: float | None
    extra: dict[str, Any]


def job_rows(state_dir: Path) -> list[Row]:
    """Every row of the job store, oldest first; [] before the daemon created it."""
    db = state_dir / "jobs.sqlite3"
    if not db.exists():
        return []
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute(
            "SELECT id, path, size, state, attempts, last_error, language, worker_pid, enqueued_at, started_at,"
            " finished_at, extra_json FROM jobs ORDER BY id"
        ).fetchall()
    except sqlite3.OperationalError:  # created but not migrated yet
        return []
    finally:
        conn.close()
    return [Row(r[0], Path(os.fsdecode(r[1])), r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10],
                json.loads(r[11] or "{}")) for r in rows]


def rows_for(state_dir: Path, path: Path) -> list[Row]:
    return [r for r in job_rows(state_dir) if r.path == path]


def final_row(state_dir: Path, path: Path, timeout: float = JOB_TIMEOUT) -> Row:
    """Wait until `path` has a job in a final state (done or failed) and return that row."""
    def finished() -> Row | None:
        rows = [r for r in rows_for(state_dir, path) if r.state in ("done", "failed")]
        return rows[-1] if rows else None

    return wait_for(finished, timeout, f"a finished job for {path.name}", interval=0.2)


def queue_idle(state_dir: Path) -> bool:
    return not any(r.state in ("queued", "running") for r in job_rows(state_dir))


# -- the daemon process -------------------------------------------------------------------------


def parse_time(stamp: str) -> float:
    """structlog's ISO UTC timestamp as epoch seconds."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


class DaemonProcess:
    """`python -m whisperd run` in its own session, its stdout parsed as JSON log events."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None,
                 precision: str = PRECISION, backend: str = BACKEND, engine_flags: bool = True) -> None:
        self.engine_flags = engine_flags  # False: the engine comes from the config alone (reload tests)
        self.precision = precision
        self.backend = backend
        self.config = config
        self.log_path = log_path
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.events: list[dict[str, Any]] = []
        self.worker_pids: set[int] = set()
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> DaemonProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_"))}
        env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **self.env})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "whisperd", "run", "--config", str(self.config),
             *(["--model", MODEL, "--precision", self.precision, "--device", "cpu", "--backend", self.backend]
               if self.engine_flags else [])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=self.config.parent, start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        return self

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with open(self.log_path, "ab") as log:
            for raw in proc.stdout:
                log.write(raw)
                log.flush()
                line = raw.decode("utf-8", "replace").strip()
                try:
                    event = json.loads(line)
                except ValueError:
                    event = {"event": None, "raw": line}
                if not isinstance(event, dict):
                    event = {"event": None, "raw": line}
                with self._lock:
                    self.events.append(event)
                    if event.get("event") == "worker ready":
                        self.worker_pids.add(int(event["worker_pid"]))

    # -- events ------------------------------------------------------------------------------

    def named(self, name: str, **match: Any) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e.get("event") == name
                    and all(e.get(k) == v for k, v in match.items())]

    def wait_event(self, name: str, timeout: float = JOB_TIMEOUT, count: int = 1, **match: Any) -> dict[str, Any]:
        def seen() -> list[dict[str, Any]]:
            self.check_alive(f"waiting for {name!r}")
            found = self.named(name, **match)
            return found if len(found) >= count else []

        return wait_for(seen, timeout, f"log event {name!r} {match or ''} x{count}")[count - 1]

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        return self.wait_event("worker ready", timeout)

    def check_alive(self, doing: str = "") -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"whisperd exited with {self.proc.returncode} while {doing}; log tail:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- process control ---------------------------------------------------------------------

    def send(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(10)
        return code

    def status_file(self) -> dict[str, Any]:
        config = yaml.safe_load(self.config.read_text())
        state_dir = (self.config.parent / config["state_dir"]).resolve()
        return json.loads((state_dir / "daemon.json").read_text())

    def family(self) -> list[psutil.Process]:
        """The daemon and every process below it (worker, multiprocessing's resource tracker)."""
        try:
            daemon = psutil.Process(self.pid)
            return [daemon, *daemon.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_bytes(self) -> dict[str, int]:
        """Resident memory of the daemon and of its children (the worker holds the model)."""
        out = {"daemon": 0, "children": 0}
        for proc in self.family():
            try:
                rss = proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            out["daemon" if proc.pid == self.pid else "children"] += rss
        return out

    def kill_all(self) -> None:
        """Teardown: SIGKILL the whole session, and any worker that somehow left it; nothing may leak."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in self.worker_pids:
            kill_quietly(pid)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.stdout is not None and self._reader is not None:
            self._reader.join(5)


def kill_quietly(pid: int) -> None:
    try:
        if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            os.kill(pid, signal.SIGKILL)
    except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
        pass


def gone(pids: list[int]) -> bool:
    """True once none of `pids` is a live (non-zombie) process."""
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


@contextmanager
def running_daemon(config: Path, log_path: Path, env: dict[str, str] | None = None,
                   ready: bool = True, engine_flags: bool = True) -> Iterator[DaemonProcess]:
    """Start a daemon (waiting for its model unless `ready` is False) and always kill it afterwards."""
    daemon = DaemonProcess(config, log_path, env, engine_flags=engine_flags).start()
    try:
        if ready:
            daemon.wait_ready()
        yield daemon
    finally:
        daemon.kill_all()


def whisperd_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Another `whisperd` command, as a user would type it next to the running daemon."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "whisperd", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


# -- sd_notify ----------------------------------------------------------------------------------


class NotifySocket:
    """A stand-in for systemd's notification socket: a bound AF_UNIX datagram socket that
    collects every message the daemon sends, with the time it arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode("utf-8").splitlines() if "=" in line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def with_key(self, key: str, value: str | None = None) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return [(t, m) for t, m in self.messages if key in m and (value is None or m[key] == value)]

    def wait_for(self, key: str, value: str | None = None, timeout: float = JOB_TIMEOUT, count: int = 1,
                 after: float = 0.0) -> tuple[float, dict[str, str]]:
        def seen() -> list[tuple[float, dict[str, str]]]:
            found = [(t, m) for t, m in self.with_key(key, value) if t >= after]
            return found if len(found) >= count else []

        return wait_for(seen, timeout, f"sd_notify {key}={value or '*'} x{count}")[count - 1]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
