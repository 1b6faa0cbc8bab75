"""Keeps one inference worker process alive and runs jobs through it with a deadline.

A worker that crashes or overruns its deadline is killed and started again; the daemon decides
whether the job is retried or failed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from whisperd.errors import WhisperdError
from whisperd.logs import get_logger
from whisperd.options import EngineSettings
from whisperd.protocol import (AttemptOutcome, Fatal, JobDone, JobFailed, JobOutcome, JobProgress, JobRequest, Ready,
                               Stop)
from whisperd.worker import worker_main

log = get_logger(__name__)
POLL_SECONDS = 0.5


class WorkerStartError(WhisperdError, RuntimeError):
    """The worker could not load the model (bad model name, unsupported device)."""


class WorkerSupervisor:
    def __init__(self, settings: EngineSettings, log_format: str, log_level: str,
                 load_timeout: float = 600.0) -> None:
        self.settings = settings
        self.log_format = log_format
        self.log_level = log_level
        self.load_timeout = load_timeout
        self._ctx = mp.get_context("spawn")
        self._process: mp.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self.ready_info: Ready | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def start(self, tick: Callable[[], bool] = lambda: True) -> Ready:
        """Spawn the worker and wait for it to load the model. `tick` runs while waiting; False aborts."""
        self.stop()
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(
            target=worker_main, args=(child, self.settings, self.log_format, self.log_level, os.getpid()),
            name="whisperd-worker", daemon=True,
        )
        process.start()
        child.close()
        self._process, self._conn = process, parent
        self.starts += 1
        deadline = time.monotonic() + self.load_timeout
        while time.monotonic() < deadline:
            if not tick():
                self.stop(graceful=False)  # it reads no messages while loading
                raise WorkerStartError("interrupted while loading the model")
            if parent.poll(POLL_SECONDS):
                try:
                    message = parent.recv()
                except EOFError:
                    break
                if isinstance(message, Ready):
                    self.ready_info = message
                    log.info("worker ready", worker_pid=message.pid, load_seconds=round(message.load_seconds, 2),
                             **message.engine)
                    return message
                if isinstance(message, Fatal):
                    self.stop()
                    raise WorkerStartError(message.error)
            elif not process.is_alive():
                break
        code = process.exitcode
        self.stop()
        raise WorkerStartError(f"worker exited while loading the model (exit code {code})"
                               if code is not None else "worker did not load the model in time")

    def run_job(self, request: JobRequest, timeout: float, tick: Callable[[], bool] = lambda: True, *,
                on_progress: Callable[[JobProgress], None] = lambda _: None) -> JobOutcome:
        """Send one job and wait for its reply, calling `tick` about twice a second.

        `tick` returning False means the daemon wants to stop now: the worker is killed and the
        outcome is `interrupted`, so the job can be requeued. The worker's progress reports go to
        `on_progress` on the way; they change neither the deadline nor the checks.
        """
        if not self.alive():
            self.start(tick)
        assert self._conn is not None and self._process is not None
        try:
            self._conn.send(request)
        except OSError:  # BrokenPipeError: it died since alive() said otherwise
            return self._lost(AttemptOutcome.CRASHED, "the worker process died before it got the job")
        deadline = time.monotonic() + timeout
        while True:
            if self._conn.poll(POLL_SECONDS):
                try:
                    reply = self._conn.recv()
                except (EOFError, OSError):
                    return self._lost(AttemptOutcome.CRASHED, "the worker process died during the job")
                if not isinstance(reply, JobProgress):
                    return self._outcome(reply)
                if reply.job_id == request.job_id:
                    on_progress(reply)
            if not self._process.is_alive():
                return self._lost(AttemptOutcome.CRASHED,
                                  f"the worker process died during the job (exit code {self._process.exitcode})")
            if time.monotonic() > deadline:
                return self._lost(AttemptOutcome.TIMEOUT,
                                  f"the job ran past its {timeout:.0f} s timeout; the worker was restarted")
            if not tick():
                return self._lost(AttemptOutcome.INTERRUPTED, "the daemon stopped during the job")

    def _outcome(self, reply: object) -> JobOutcome:
        """What the worker's final reply to a job means."""
        if isinstance(reply, JobDone):
            return JobOutcome(AttemptOutcome.DONE, done=reply)
        if isinstance(reply, JobFailed):
            kind = AttemptOutcome.GONE if reply.gone else AttemptOutcome.ERROR
            return JobOutcome(kind, error=reply.error, permanent=reply.permanent)
        return self._lost(AttemptOutcome.CRASHED, f"the worker sent an unexpected {type(reply).__name__}")

    def _lost(self, kind: AttemptOutcome, error: str) -> JobOutcome:
        log.warning("worker lost", reason=kind.value, worker_pid=self.pid, error=error)
        self.stop(graceful=False)
        return JobOutcome(kind, error=error)

    def stop(self, graceful: bool = True) -> None:
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if process is None:
            return
        if graceful and process.is_alive() and conn is not None:
            try:
                conn.send(Stop())
            except (BrokenPipeError, OSError):
                pass
            process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)
        if conn is not None:
            conn.close()
