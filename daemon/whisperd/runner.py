"""Jobs through the worker, and their outcomes into the job store: the state machine of an attempt.

Separate from the daemon's lifecycle (start-up, signals, reload, shutdown: whisperd.service), so
that every path a job can take (done, transient error, permanent error, timeout, crash,
interrupted, recording gone, gave up after N attempts) can be tested in milliseconds against a
fake worker. Every failed attempt goes through the one RetryPolicy; the store only records.

Several hosts may share one job store: each claim carries a lease that `heartbeat` renews while the
worker runs, and a fencing token that every outcome is recorded under, so a host that lost its
claim (it hung, or lost the database for longer than the lease) cannot overwrite the outcome of the
host that took the job over. `reap_expired` returns the jobs of hosts that stopped renewing.

Up to `at_once` jobs run in the worker at once (on an engine whose windows share batches); each is
recorded on its own. A job that failed before (it may be what crashes the worker) runs alone, so
it cannot cost other jobs an attempt.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from whisperd.atomic import atomic_write_text, mode_like
from whisperd.audio import probe_duration
from whisperd.config import JobConfig
from whisperd.jobstore import HookEvent, Job, JobStateError, JobStore, JobStoreError, JobStoreUnavailable
from whisperd.logs import get_logger
from whisperd.naming import NameTooLongError, check_name_fits, error_file_for, output_paths, stale_temps_for
from whisperd.options import OUTPUT_FORMATS
from whisperd.protocol import AttemptOutcome, JobOutcome, JobProgress, JobRequest
from whisperd.recording import RecordingRefused, open_recording
from whisperd.retry import RetryPolicy
from whisperd.rules import EffectiveRules, InboxRules, RuleError
from whisperd.status import JobProgressEstimate
from whisperd.supervisor import WorkerStartError

if TYPE_CHECKING:
    from whisperd.metrics import Metrics

log = get_logger("whisperd.runner")
INTERRUPTED_ERROR = "interrupted: whisperd stopped while this job was running"
#: Waits between attempts to record an outcome while the job database is unreachable.
RECORD_BACKOFF_FIRST_S = 0.5
RECORD_BACKOFF_MAX_S = 10.0
T = TypeVar("T")


class Worker(Protocol):
    """What the runner needs of the supervised worker process (whisperd.supervisor)."""

    def submit(self, request: JobRequest, timeout: float, tick: Callable[[], bool], *,
               on_progress: Callable[[JobProgress], None]) -> None: ...

    def poll(self, tick: Callable[[], bool]) -> dict[int, JobOutcome]: ...


@dataclass
class RunningJob:
    """A job in the worker: what recording its outcome needs, and what status shows of it."""

    job: Job
    rules: EffectiveRules | None  # None while it waits to run alone
    started_at: float
    renewed_at: float
    progress: JobProgressEstimate | None = None
    lease_lost: bool = False


def _runs_alone(job: Job) -> bool:
    """A job that failed before may be what crashes or stalls the worker: it runs with no other
    job beside it, so a crash it causes again costs no other job an attempt."""
    return job.attempts > 0


def remove_stale_temp_outputs(audio: Path, older_than: float | None = None) -> None:
    """Temp files a killed worker left for this file's outputs (every format: the rules may have
    changed since the attempt that left them). With `older_than` (the lease), another host's temps
    only once they are that old: younger ones may be that host's write in progress."""
    for stale in stale_temps_for(audio, OUTPUT_FORMATS, older_than):
        stale.unlink(missing_ok=True)


def remove_error_note(audio: Path) -> None:
    """The note of an earlier failure goes once the file is done (best effort: a name too long
    for a note never had one)."""
    try:
        error_file_for(audio).unlink(missing_ok=True)
    except OSError as exc:
        log.debug("cannot remove error note", path=str(audio), error=str(exc))


def outputs_up_to_date(audio: Path, st: os.stat_result, formats: tuple[str, ...]) -> bool:
    """Every output exists and is newer than the audio: done before (by us or by hand)."""
    try:
        return all(p.stat().st_mtime_ns >= st.st_mtime_ns for p in output_paths(audio, formats).values())
    except OSError:
        return False


def write_error_note(path: Path, error: str, attempts: int) -> None:
    """Tell the user next to the file. Best effort: a name too long for a note, an unwritable
    folder or a name that is not UTF-8 must never keep the job from being recorded failed."""
    note = (
        f"whisperd could not transcribe {path.name}\n\n{error}\n\n"
        f"attempts: {attempts}\ntime: {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n"
        "Replace or touch the file to try again.\n"
    )
    try:
        mode = mode_like(os.stat(path).st_mode)
    except OSError:
        mode = 0o600
    try:
        atomic_write_text(error_file_for(path), note, mode)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("cannot write error file", path=str(path), error=f"{type(exc).__name__}: {exc}")


class JobRunner:
    """Runs claimed jobs through the worker, up to `at_once` side by side; `running` are the jobs in
    the worker, with their progress (for status)."""

    def __init__(self, store: JobStore, jobs: JobConfig, rules: InboxRules,
                 on_change: Callable[[], None] = lambda: None, tick: Callable[[], bool] = lambda: True,
                 metrics: Metrics | None = None, on_progress: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.metrics = metrics
        #: Completion hook events for a job reaching done or failed (recorded in the same transaction).
        self.hook_events: Callable[[str, Job, list[str], str | None], list[HookEvent]] = lambda *_: []
        self.rules = rules
        self.on_change = on_change
        self.tick = tick  # the daemon's: keeps the watchdog fed while we wait; False once we must stop
        self.running: dict[int, RunningJob] = {}
        # Claimed, and starts once the worker is empty: a job that failed before, or a newer version
        # of a file whose older one is still in the worker (their outputs must not race).
        self.waiting_alone: RunningJob | None = None
        self.at_once = 1  # jobs in the worker at once (the service sets it from the engine)
        self.on_progress = on_progress  # after each of the worker's progress reports
        self.lease_lost = False  # a lease was lost since the worker last started from empty
        self.configure(jobs)

    @property
    def current(self) -> Job | None:
        """The longest-running job in the worker (status shows it first)."""
        return next(iter(self.running.values())).job if self.running else None

    @property
    def progress(self) -> JobProgressEstimate | None:
        return next(iter(self.running.values())).progress if self.running else None

    @property
    def busy(self) -> bool:
        return bool(self.running) or self.waiting_alone is not None

    def has_room(self) -> bool:
        """Whether another claimed job can start now."""
        return (len(self.running) < self.at_once and self.waiting_alone is None
                and not any(_runs_alone(r.job) for r in self.running.values()))

    def configure(self, jobs: JobConfig) -> None:
        """New retry and timeout settings (SIGHUP); they apply from the next attempt."""
        self.jobs = jobs
        self.policy = RetryPolicy(jobs.max_attempts, jobs.retry_backoff_seconds)

    # -- start-up ---------------------------------------------------------------------------

    def recover_interrupted(self) -> int:
        """Jobs this host left `running` when it died: each counts as a failed attempt (the file may
        have caused the crash) and goes through the retry policy. Call before any worker starts.
        Other hosts' running jobs are theirs until their lease expires (`reap_expired`)."""
        interrupted = self._record(lambda: self.store.running(owner=self.store.host_id))
        for job in interrupted:
            self._failed_attempt(job, AttemptOutcome.CRASHED, INTERRUPTED_ERROR, permanent=False)
        return len(interrupted)

    def reap_expired(self) -> int:
        """Between jobs: running jobs whose owner stopped renewing the lease (it died, hangs or lost
        the database) go back through the retry policy like a crash; returns how many. Claims of
        ours that no worker runs (the reply to a claim was lost with the connection) go back
        uncounted."""
        for job in self.store.running(owner=self.store.host_id):
            if job.id not in self.running and (self.waiting_alone is None or job.id != self.waiting_alone.job.id):
                try:
                    self.store.requeue(job.id, token=job.token, error="requeued: claimed by this host but never run")
                    log.info("job requeued", job_id=job.id, path=str(job.path), result="never_run")
                except JobStateError:
                    pass
        count = 0
        for job in self.store.expired():
            if job.owner == self.store.host_id:
                continue
            error = f"host {job.owner} stopped renewing its lease on this job (it died, hung or lost the job database)"
            try:
                self._failed_attempt(job, AttemptOutcome.CRASHED, error, permanent=False, expired=True)
                count += 1
            except JobStateError:
                pass  # renewed meanwhile, or another host took it back first
        return count

    # -- leases -----------------------------------------------------------------------------

    def heartbeat(self) -> None:
        """Renew the leases of the jobs in the worker (and of one waiting to run alone), each at
        most every third of the lease. A refused renewal means another host took that job back:
        `lease_lost` makes the job tick stop the worker."""
        now = time.monotonic()
        held = list(self.running.values()) + ([self.waiting_alone] if self.waiting_alone else [])
        for running in held:
            if now - running.renewed_at < self.store.lease_seconds / 3:
                continue
            running.renewed_at = now
            job = running.job
            try:
                self.store.renew(job.id, job.token)
            except JobStateError as exc:
                running.lease_lost = self.lease_lost = True
                log.warning("lease lost: another host has taken this job back; stopping it here",
                            job_id=job.id, path=str(job.path), error=str(exc))
            except JobStoreUnavailable as exc:
                log.warning("cannot renew the job's lease: the job database is unavailable",
                            job_id=job.id, path=str(job.path), error=str(exc))

    def _job_tick(self) -> bool:
        self.heartbeat()
        return self.tick() and not any(r.lease_lost for r in self.running.values())

    def _record(self, call: Callable[[], T]) -> T:
        """A call the job store must see: while the database is unreachable, wait and try again
        (the outputs already written stay in place) for as long as the daemon's tick allows."""
        delay, down = RECORD_BACKOFF_FIRST_S, False
        while True:
            try:
                result = call()
            except JobStoreUnavailable as exc:
                if not down:
                    log.warning("job database unavailable; waiting to record", error=str(exc))
                    down = True
                if not self._pause(delay):
                    raise
                delay = min(delay * 2, RECORD_BACKOFF_MAX_S)
                continue
            if down:
                log.info("job database reachable again")
            return result

    def _pause(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if not self.tick():
                return False
            time.sleep(min(0.5, left))
        return self.tick()

    # -- one job ----------------------------------------------------------------------------

    def process_guarded(self, job: Job, worker: Worker, tick: Callable[[], bool]) -> None:
        """`job` from start to recorded outcome, with nothing else in the worker (tests, and a
        service that runs one job at a time)."""
        self.tick = tick
        self.start_guarded(job, worker)
        while self.busy:
            self.collect(worker)

    def start_guarded(self, job: Job, worker: Worker) -> None:
        """Check a claimed job and send it to the worker (or record why it cannot run)."""
        same_file = any(r.job.path == job.path for r in self.running.values())  # a newer version of it
        if (_runs_alone(job) or same_file) and self.running:
            now = time.monotonic()
            self.waiting_alone = RunningJob(job, None, started_at=now, renewed_at=now)
            return
        self._guarded(job, lambda: self._start(job, worker))

    def collect(self, worker: Worker) -> None:
        """Wait (about half a second at most) for the worker, and record each job that ended. A job
        waiting to run alone starts once the worker is empty."""
        outcomes = worker.poll(self._job_tick)
        for job_id, outcome in outcomes.items():
            running = self.running.pop(job_id, None)
            if running is not None:
                self._guarded(running.job, functools.partial(self._record_outcome, running, outcome))
        if not self.running:
            if (waiting := self.waiting_alone) is not None:
                self.waiting_alone = None
                if waiting.lease_lost:  # another host took it back while it waited
                    log.warning("job taken over by another host before it ran here", job_id=waiting.job.id,
                                path=str(waiting.job.path))
                else:
                    self._guarded(waiting.job, lambda: self._start(waiting.job, worker))

    def finish(self, worker: Worker) -> None:
        """Stopping: a job claimed to run alone goes back to the queue uncounted at once; the jobs
        in the worker finish while the daemon's tick allows, then go back the same way."""
        if (waiting := self.waiting_alone) is not None:
            self.waiting_alone = None
            job = waiting.job
            try:
                self.store.requeue(job.id, error="requeued: whisperd stopped before the job ran", token=job.token)
            except (JobStoreError, JobStateError) as exc:  # recovered at restart, or by another host
                log.warning("cannot requeue a claimed job", job_id=job.id, error=str(exc))
        while self.running:
            self.collect(worker)

    def _record_outcome(self, running: RunningJob, outcome: JobOutcome) -> None:
        assert running.rules is not None
        self.record(running.job, outcome, running.rules, lease_lost=running.lease_lost)

    def _guarded(self, job: Job, step: Callable[[], None]) -> None:
        """One job's unexpected error (a bug, a database hiccup) must not take the daemon down, nor
        the other jobs in the worker."""
        try:
            step()
        except JobStateError as exc:
            self.running.pop(job.id, None)
            log.warning("job taken over by another host; this attempt's outcome is dropped",
                        job_id=job.id, path=str(job.path), error=str(exc))
        except JobStoreUnavailable as exc:
            self.running.pop(job.id, None)
            log.warning("job database still unavailable while stopping; the job goes back to the queue "
                        "when this host restarts or its lease expires", job_id=job.id, error=str(exc))
        except Exception as exc:
            self.running.pop(job.id, None)
            log.exception("unexpected error while handling a job", job_id=job.id, path=str(job.path))
            error = f"internal error in whisperd: {type(exc).__name__}: {exc}"
            try:
                try:
                    self.fail(job, error)
                except (JobStateError, JobStoreUnavailable):
                    raise
                except Exception:
                    self.store.mark_failed(job.id, error, token=job.token)  # never leave it `running` for ever
            except JobStateError:
                pass  # no longer ours to record
            except Exception:
                log.exception("cannot record the failure", job_id=job.id)

    def _start(self, job: Job, worker: Worker) -> None:
        path = job.path
        bound = log.bind(job_id=job.id, path=str(path))
        try:
            st = path.stat()
        except FileNotFoundError:
            self._dropped_deleted(job)
            return
        except OSError as exc:
            self.fail(job, f"{path.name}: cannot read ({exc.strerror or exc})")
            return
        if (st.st_size, st.st_mtime_ns) != (job.size, job.mtime_ns):
            self._finished(self._record(lambda: self.store.mark_superseded(
                job.id, "the file changed; its new version is queued", token=job.token)))
            self._record(lambda: self.store.enqueue(path, st.st_size, st.st_mtime_ns))
            bound.info("job dropped", result="changed")
            return
        if st.st_size == 0:
            self.fail(job, f"{path.name}: empty file (0 bytes): there is nothing to transcribe")
            return
        try:
            rules = self.rules.effective(path)
            options = rules.decode_options()
            for target in output_paths(path, rules.outputs).values():
                check_name_fits(target)
        except (RuleError, ValueError, NameTooLongError) as exc:
            self.fail(job, str(exc))
            return
        if self._finished_before_restart(job, st, rules.outputs):
            return
        inbox = self.rules.inbox_for(path)
        try:
            with open_recording(path, inbox.path if inbox else None,
                                inbox.follow_links_outside if inbox else False) as recording:
                audio_seconds = probe_duration(recording.read_path)
        except FileNotFoundError:
            self._dropped_deleted(job)
            return
        except RecordingRefused as exc:
            self.fail(job, str(exc))
            return
        timeout = self.jobs.timeout_for(audio_seconds)
        remove_stale_temp_outputs(path, self.store.lease_seconds)
        now = time.monotonic()  # the claim has just set the lease
        if not self.running:
            self.lease_lost = False
        self.running[job.id] = running = RunningJob(job, rules, started_at=now, renewed_at=now)
        if self.metrics:
            self.metrics.job_started(job)
        self.on_change()
        bound.info("job started", audio_seconds=audio_seconds, attempt=job.attempts + 1,
                   language=options.language, task=options.task, rules=[str(s) for s in rules.sources],
                   in_worker=len(self.running))
        request = JobRequest(job_id=job.id, path=path, options=options, outputs=rules.outputs,
                             inbox_root=inbox.path if inbox else None,
                             follow_links_outside=bool(inbox and inbox.follow_links_outside),
                             expected=(job.size, job.mtime_ns))
        try:
            worker.submit(request, timeout, self._job_tick,
                          on_progress=lambda report: self._progressed(running, report))
        except WorkerStartError as exc:
            del self.running[job.id]
            self.record(job, JobOutcome(AttemptOutcome.CRASHED, error=f"the worker could not start: {exc}"), rules)

    def _progressed(self, running: RunningJob, report: JobProgress) -> None:
        running.progress = JobProgressEstimate(report.position_seconds, report.duration_seconds,
                                               time.monotonic() - running.started_at)
        self.on_progress()

    def _finished(self, job: Job) -> None:
        if self.metrics:
            self.metrics.job_finished(job)

    def _attempt(self, outcome: AttemptOutcome) -> None:
        if self.metrics:
            self.metrics.attempt(outcome.value)

    def _dropped_deleted(self, job: Job) -> None:
        self._finished(self._record(lambda: self.store.mark_superseded(
            job.id, "the file was deleted before it was transcribed", token=job.token)))
        log.info("job dropped", job_id=job.id, path=str(job.path), result="deleted")

    def _finished_before_restart(self, job: Job, st: os.stat_result, formats: tuple[str, ...]) -> bool:
        """A job interrupted after its outputs were renamed into place (killed before it was recorded
        done) is recorded done now instead of being run again: its complete output set is there and
        newer than the recording. A partial set (killed between two renames) is redone."""
        interrupted = job.attempts > 0 or job.last_error is not None
        if not interrupted or not outputs_up_to_date(job.path, st, formats):
            return False
        outputs = [str(p) for p in output_paths(job.path, formats).values()]
        hooks = self.hook_events("job.done", job, outputs, None)
        self._finished(self._record(lambda: self.store.mark_done(job.id, None, None, None, token=job.token, extra={
            "outputs": outputs, "note": "outputs were already in place from the interrupted attempt"}, hooks=hooks)))
        remove_error_note(job.path)
        log.info("job done", job_id=job.id, path=str(job.path), result="already_written")
        self.on_change()
        return True

    # -- recording the outcome --------------------------------------------------------------

    def record(self, job: Job, outcome: JobOutcome, rules: EffectiveRules, *, lease_lost: bool = False) -> None:
        bound = log.bind(job_id=job.id, path=str(job.path))
        if outcome.kind is AttemptOutcome.DONE and outcome.done is not None:
            done = outcome.done
            self._attempt(outcome.kind)  # failed attempts are counted by _failed_attempt
            done_job = replace(job, audio_seconds=done.audio_seconds, wall_seconds=done.wall_seconds,
                               language=done.language)
            hooks = self.hook_events("job.done", done_job, list(done.outputs), None)
            recorded = self._record(lambda: self.store.mark_done(
                job.id, done.audio_seconds, done.wall_seconds, done.language, token=job.token, hooks=hooks,
                extra={"outputs": list(done.outputs), "worker_pid": done.pid, "worker_jobs_done": done.jobs_done,
                       "language_probability": done.language_probability,
                       "rules": [str(s) for s in rules.sources]}))
            self._finished(recorded)
            remove_error_note(job.path)
            remove_stale_temp_outputs(job.path, self.store.lease_seconds)  # a dead host's, now old enough
            bound.info("job done", result="done", audio_seconds=round(done.audio_seconds, 2),
                       wall_seconds=round(done.wall_seconds, 2), language=done.language,
                       worker_pid=done.pid, segments=done.segments)
        elif outcome.kind is AttemptOutcome.GONE:
            self._attempt(outcome.kind)
            self._finished(self._record(lambda: self.store.mark_superseded(job.id, outcome.error, token=job.token)))
            bound.info("job dropped", result="gone", error=outcome.error)
        elif outcome.kind is AttemptOutcome.INTERRUPTED:
            self._attempt(outcome.kind)
            remove_stale_temp_outputs(job.path, self.store.lease_seconds)
            if lease_lost:
                raise JobStateError(f"job {job.id}: the lease was lost during the job")
            reason = outcome.error if outcome.error.startswith("requeued:") else "requeued: whisperd stopped during the job"
            self._record(lambda: self.store.requeue(job.id, error=reason, token=job.token))
            bound.info("job requeued", result="requeued", reason=reason)
        else:
            self._failed_attempt(job, outcome.kind, outcome.error, permanent=outcome.permanent)
        self.on_change()

    def _failed_attempt(self, job: Job, kind: AttemptOutcome, error: str, *, permanent: bool,
                        expired: bool = False) -> None:
        if not expired:  # another host's attempt is not one of ours
            self._attempt(kind)
        decision = self.policy.decide(error, permanent=permanent, failed_attempts=job.attempts + 1)
        if not decision.retry:
            self.fail(job, decision.error, expired=expired)  # sweeps the temps itself
            return
        remove_stale_temp_outputs(job.path, self.store.lease_seconds)
        self._record(lambda: self.store.mark_retry(job.id, decision.error, decision.delay_seconds,
                                                   token=job.token, expired=expired))
        log.warning("job will be retried", job_id=job.id, path=str(job.path), result=kind.value,
                    error=decision.error, attempt=job.attempts + 1, retry_in_seconds=decision.delay_seconds)

    def fail(self, job: Job, error: str, *, expired: bool = False) -> None:
        """Tell the user next to the file (removed again when a later run succeeds), then mark failed.

        The note comes first, so that whoever sees `failed` in the job store or the log finds it.
        """
        attempts = job.attempts + 1  # mark_failed counts the failing attempt
        remove_stale_temp_outputs(job.path, self.store.lease_seconds)
        write_error_note(job.path, error, attempts)
        hooks = self.hook_events("job.failed", replace(job, attempts=attempts), [], error)
        failed = self._record(lambda: self.store.mark_failed(job.id, error, token=job.token, expired=expired,
                                                             hooks=hooks))
        self._finished(failed)
        log.error("job failed", job_id=job.id, path=str(job.path), result="failed", error=error,
                  attempts=failed.attempts)
        self.on_change()
