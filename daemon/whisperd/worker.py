"""The inference worker process: loads the model once, then transcribes one job at a time.

It runs apart from the daemon so that a native crash, a hang or a leak in the inference stack
costs one retry, not the service. Messages are plain dicts over a multiprocessing Pipe.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from whisperd.options import DecodeOptions, EngineSettings

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PROCESS_NAME = b"whisperd-worker"  # what ps, top and pgrep show (at most 15 bytes)
# Errors that will not go away by trying again.
PERMANENT_ERRNOS = {errno.ENOENT, errno.EISDIR, errno.EACCES, errno.EPERM}


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to kill this process if the daemon dies, so an orphan never writes outputs twice.

    The daemon may have died before the request was made (it would never fire then), so check
    that it is still our parent afterwards. Also name the process, so it is recognisable in ps.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(PROCESS_NAME))
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def classify_error(exc: BaseException) -> bool:
    """True when retrying cannot help (bad audio, unusable request, file gone); False for transient errors."""
    from whisperd.audio import AudioDecodeError
    from whisperd.engine import TranscriptionError

    declared = getattr(exc, "permanent", None)
    if isinstance(declared, bool):
        return declared
    if isinstance(exc, (AudioDecodeError, TranscriptionError, ValueError)):
        return True
    if isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS:
        return True
    return False


def describe_error(exc: BaseException) -> str:
    """Our own errors already read as sentences naming the file; others get their type for context."""
    from whisperd.audio import AudioDecodeError
    from whisperd.engine import TranscriptionError

    from whisperd.naming import NameTooLongError
    from whisperd.recording import RecordingGone, RecordingRefused

    if isinstance(exc, (AudioDecodeError, TranscriptionError, RecordingGone, RecordingRefused, NameTooLongError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def run_job(engine: Any, request: dict[str, Any]) -> dict[str, Any]:
    from whisperd.recording import RecordingGone
    from whisperd.transcribe_file import transcribe_file

    options: DecodeOptions = request["options"]
    inbox_root = request.get("inbox_root")
    expected = (request["size"], request["mtime_ns"]) if "size" in request else None
    try:
        result = transcribe_file(engine, Path(request["path"]), options, tuple(request["outputs"]),
                                 inbox_root=Path(inbox_root) if inbox_root else None,
                                 follow_links_outside=bool(request.get("follow_links_outside")), expected=expected)
    except Exception as exc:  # reported to the daemon, which decides retry or failure
        return {
            "type": "error",
            "job_id": request["job_id"],
            "gone": isinstance(exc, RecordingGone),
            "permanent": classify_error(exc),
            "error": describe_error(exc),
            "traceback": traceback.format_exc(limit=5),
        }
    return {
        "type": "done",
        "job_id": request["job_id"],
        "audio_seconds": result.transcript.duration,
        "wall_seconds": result.wall_seconds,
        "language": result.transcript.language,
        "language_probability": result.transcript.language_probability,
        "segments": len(result.transcript.segments),
        "outputs": [str(p) for p in result.outputs.values()],
    }


def worker_main(conn: Connection, settings: EngineSettings, log_format: str, log_level: str,
                parent_pid: int) -> None:
    """Entry point of the worker process (spawned, so it shares no threads or locks with the daemon)."""
    die_with_parent(parent_pid)
    # The daemon decides when we stop: a signal sent to the whole process group (Ctrl-C, `timeout`,
    # KillMode=control-group) must not kill the job it would rather finish or hand back cleanly.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    from whisperd.logs import configure_logging

    configure_logging(log_format, log_level)
    from whisperd.engine import create_engine

    started = time.perf_counter()
    try:
        engine = create_engine(settings)
    except Exception as exc:
        conn.send({"type": "fatal", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=5)})
        return
    conn.send({"type": "ready", "pid": os.getpid(), "load_seconds": time.perf_counter() - started,
               "engine": engine.describe()})
    jobs_done = 0
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        kind = request.get("type")
        if kind == "stop":
            return
        if kind == "job":
            reply = run_job(engine, request)
            jobs_done += 1
            reply["pid"] = os.getpid()
            reply["jobs_done"] = jobs_done
            conn.send(reply)
