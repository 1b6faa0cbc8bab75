"""The inference worker process: loads the model once, then transcribes the jobs it is sent.

It runs apart from the daemon so that a native crash, a hang or a leak in the inference stack
costs one retry, not the service. Messages are the records of whisperd.protocol over a Pipe.
Each job runs in a thread of its own, so that jobs the daemon sends while others run have their
windows decoded in the same batches (on an engine that shares batches; the daemon sends one job at
a time to one that does not). Replies and progress are sent whole, one at a time, under a lock.
"""

from __future__ import annotations

import ctypes
import importlib
import math
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from whisperd.errors import WhisperdError, is_permanent
from whisperd.options import EngineSettings
from whisperd.protocol import Fatal, JobDone, JobFailed, JobProgress, JobRequest, Ready, Stop

if TYPE_CHECKING:
    from whisperd.engine import Progress, ProgressCallback

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PROCESS_NAME = b"whisperd-worker"  # what ps, top and pgrep show (at most 15 bytes)
PROGRESS_INTERVAL_S = 1.0  # status and systemd need no more; each report costs the daemon a status write


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


def describe_error(exc: BaseException) -> str:
    """whisperd's own errors already read as sentences naming the file; others get their type for context."""
    from whisperd.audio import AudioDecodeError
    from whisperd.engine import TranscriptionError

    if isinstance(exc, (WhisperdError, AudioDecodeError, TranscriptionError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def progress_reporter(job_id: int, send: Callable[[JobProgress], None],
                      interval: float = PROGRESS_INTERVAL_S) -> ProgressCallback:
    """The engine's progress as JobProgress messages: the first at once (the daemon learns the
    duration early), then at most one per `interval` (JobDone says the rest)."""
    last = -math.inf

    def report(progress: Progress) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= interval:
            last = now
            send(JobProgress(job_id, progress.position, progress.duration))

    return report


def run_job(engine: Any, request: JobRequest, jobs_done: int,
            send_progress: Callable[[JobProgress], None] = lambda _: None) -> JobDone | JobFailed:
    from whisperd.recording import RecordingGone
    from whisperd.transcribe_file import transcribe_file

    try:
        result = transcribe_file(engine, request.path, request.options, request.outputs,
                                 inbox_root=request.inbox_root, follow_links_outside=request.follow_links_outside,
                                 expected=request.expected, progress=progress_reporter(request.job_id, send_progress))
    except Exception as exc:  # reported to the daemon, whose retry policy decides
        return JobFailed(job_id=request.job_id, pid=os.getpid(), jobs_done=jobs_done, error=describe_error(exc),
                         permanent=is_permanent(exc), gone=isinstance(exc, RecordingGone),
                         traceback=traceback.format_exc(limit=5))
    return JobDone(
        job_id=request.job_id, pid=os.getpid(), jobs_done=jobs_done,
        audio_seconds=result.transcript.duration, wall_seconds=result.wall_seconds,
        language=result.transcript.language, language_probability=result.transcript.language_probability,
        segments=len(result.transcript.segments), outputs=tuple(str(p) for p in result.outputs.values()),
    )


def internal_error(request: JobRequest, jobs_done: int, what: str, exc: BaseException) -> JobFailed:
    """A failure of whisperd itself during a job (not of the recording): retried like a crash."""
    from whisperd.logs import get_logger

    get_logger("whisperd.worker").error("internal error in a job", job_id=request.job_id, path=str(request.path),
                                         what=what, error=f"{type(exc).__name__}: {exc}", exc_info=exc)
    return JobFailed(job_id=request.job_id, pid=os.getpid(), jobs_done=jobs_done,
                     error=f"internal error in the worker ({what}): {type(exc).__name__}: {exc}", permanent=False,
                     traceback="".join(traceback.format_exception(exc, limit=8)))


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
        conn.send(Fatal(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=5)))
        return
    # The job path's modules now, not in the first job: the daemon sends jobs together, and each
    # job's thread would wait for the import lock while the first one imports them.
    importlib.import_module("whisperd.transcribe_file")

    conn.send(Ready(pid=os.getpid(), load_seconds=time.perf_counter() - started, engine=engine.describe()))
    serve_jobs(conn, engine)


def serve_jobs(conn: Connection, engine: Any) -> None:
    """Run each JobRequest in its own thread until Stop or the daemon's end of the pipe closes."""
    send_lock = threading.Lock()
    jobs_done = 0

    def send(message: object) -> None:
        with send_lock:
            conn.send(message)

    def run(request: JobRequest, number: int) -> None:
        # Whatever happens in this thread, the daemon gets a reply: a thread that ended without
        # one would leave the job waiting for its deadline.
        try:
            with engine.sharing():
                reply: JobDone | JobFailed = run_job(engine, request, number, send)
        except BaseException as exc:  # noqa: BLE001 - reported to the daemon, whose retry policy decides
            reply = internal_error(request, number, "the job's thread failed", exc)
        try:
            send(reply)
        except OSError:  # the daemon is gone; PR_SET_PDEATHSIG ends this process
            pass
        except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot be pickled
            send(internal_error(request, number, "the job's result could not be sent", exc))

    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if isinstance(request, Stop):
            return
        if isinstance(request, JobRequest):
            jobs_done += 1
            threading.Thread(target=run, args=(request, jobs_done), name=f"job-{request.job_id}", daemon=True).start()
