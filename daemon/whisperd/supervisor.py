"""Keeps one inference worker process alive and runs jobs through it, each with its own deadline.

Several jobs may be in the worker at once (their windows share batches there): replies and
progress reports are routed by job id. A worker that crashes, or in which a job overruns its
deadline, is killed and started again; every job it held gets an outcome, and the daemon decides
for each whether it is retried or failed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from whisperd.errors import WhisperdError
from whisperd.logs import get_logger
from whisperd.options import EngineSettings
from whisperd.protocol import (
    AttemptOutcome,
    Fatal,
    JobDone,
    JobFailed,
    JobOutcome,
    JobProgress,
    JobRequest,
    Ready,
    Stop,
)
from whisperd.worker import worker_main

log = get_logger(__name__)
POLL_SECONDS = 0.5


class WorkerStartError(WhisperdError, RuntimeError):
    """The worker could not load the model (bad model name, unsupported device)."""


@dataclass
class _InFlight:
    """A job sent to the worker and not yet answered."""

    request: JobRequest
    timeout: float
    deadline: float
    on_progress: Callable[[JobProgress], None]


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
        self._in_flight: dict[int, _InFlight] = {}
        self._ended: dict[int, JobOutcome] = {}  # jobs a stop or restart ended, for the next poll

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

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def submit(self, request: JobRequest, timeout: float, tick: Callable[[], bool] = lambda: True, *,
               on_progress: Callable[[JobProgress], None] = lambda _: None) -> None:
        """Send a job, starting the worker first if there is none (WorkerStartError if it cannot
        load); its outcome comes from `poll`. Its progress reports go to `on_progress` on the way;
        they change neither its deadline nor the checks."""
        if not self.alive():
            self.start(tick)
        assert self._conn is not None
        self._in_flight[request.job_id] = _InFlight(request, timeout, time.monotonic() + timeout, on_progress)
        try:
            self._conn.send(request)
        except OSError:  # BrokenPipeError: it died since alive() said otherwise; poll reports it
            self._ended.update(self._lost_all(AttemptOutcome.CRASHED, "the worker process died during the job"))
            self._ended[request.job_id] = JobOutcome(AttemptOutcome.CRASHED,
                                                     error="the worker process died before it got the job")

    def poll(self, tick: Callable[[], bool] = lambda: True) -> dict[int, JobOutcome]:
        """Wait up to about half a second for the worker; the outcomes of the jobs that ended, by id.

        `tick` returning False means the daemon wants to stop now: the worker is killed and every
        job it held is `interrupted`, so they can be requeued.
        """
        ended, self._ended = self._ended, {}
        if not self._in_flight:
            return ended
        conn, process = self._conn, self._process
        if conn is None or process is None:
            return {**ended, **self._lost_all(AttemptOutcome.CRASHED, "the worker process died before it got the job")}
        if conn.poll(POLL_SECONDS):
            while True:
                try:
                    reply = conn.recv()
                except (EOFError, OSError):
                    return {**ended, **self._lost_all(AttemptOutcome.CRASHED,
                                                      "the worker process died during the job")}
                if isinstance(reply, JobProgress):
                    if (job := self._in_flight.get(reply.job_id)) is not None:
                        job.on_progress(reply)
                elif isinstance(reply, (JobDone, JobFailed)) and reply.job_id in self._in_flight:
                    del self._in_flight[reply.job_id]
                    ended[reply.job_id] = self._outcome(reply)
                else:
                    return {**ended, **self._lost_all(
                        AttemptOutcome.CRASHED, f"the worker sent an unexpected {type(reply).__name__}")}
                if not conn.poll(0):
                    break
        if not self._in_flight:
            return ended
        if not process.is_alive():
            return {**ended, **self._lost_all(
                AttemptOutcome.CRASHED, f"the worker process died during the job (exit code {process.exitcode})")}
        now = time.monotonic()
        if late := [job for job in self._in_flight.values() if now > job.deadline]:
            return {**ended, **self._timed_out(late)}
        if not tick():
            return {**ended, **self._lost_all(AttemptOutcome.INTERRUPTED, "the daemon stopped during the job")}
        return ended

    def run_job(self, request: JobRequest, timeout: float, tick: Callable[[], bool] = lambda: True, *,
                on_progress: Callable[[JobProgress], None] = lambda _: None) -> JobOutcome:
        """One job on its own: send it and wait for its outcome, calling `tick` about twice a second."""
        self.submit(request, timeout, tick, on_progress=on_progress)
        while True:
            if (outcome := self.poll(tick).get(request.job_id)) is not None:
                return outcome

    def _timed_out(self, late: list[_InFlight]) -> dict[int, JobOutcome]:
        """The late jobs time out. The others in the worker were not at fault: they are handed
        back uncounted (`interrupted`), to run again in the new worker."""
        names = ", ".join(job.request.path.name for job in late)
        outcomes = self._lost_all(AttemptOutcome.INTERRUPTED,
                                  f"requeued: the worker was restarted because {names} ran past its timeout")
        for job in late:
            outcomes[job.request.job_id] = JobOutcome(
                AttemptOutcome.TIMEOUT, error=f"the job ran past its {job.timeout:.0f} s timeout; the worker was restarted")
        return outcomes

    @staticmethod
    def _outcome(reply: JobDone | JobFailed) -> JobOutcome:
        """What the worker's final reply to a job means."""
        if isinstance(reply, JobDone):
            return JobOutcome(AttemptOutcome.DONE, done=reply)
        kind = AttemptOutcome.GONE if reply.gone else AttemptOutcome.ERROR
        return JobOutcome(kind, error=reply.error, permanent=reply.permanent)

    def _lost_all(self, kind: AttemptOutcome, error: str) -> dict[int, JobOutcome]:
        """Kill the worker; every job it held ends with `kind`."""
        held, self._in_flight = self._in_flight, {}
        log.warning("worker lost", reason=kind.value, worker_pid=self.pid, error=error, jobs=len(held))
        self.stop(graceful=False)
        return {job_id: JobOutcome(kind, error=error) for job_id in held}

    def stop(self, graceful: bool = True) -> None:
        """Stop the worker; jobs still in it end as `crashed` (the next `poll` says so)."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        for job_id in self._in_flight:
            self._ended[job_id] = JobOutcome(AttemptOutcome.CRASHED, error="the worker was stopped during the job")
        self._in_flight = {}
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
