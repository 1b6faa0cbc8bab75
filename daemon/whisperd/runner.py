"""One job through the worker, and its outcome into the job store: the state machine of an attempt.

Separate from the daemon's lifecycle (start-up, signals, reload, shutdown: whisperd.service), so
that every path a job can take (done, transient error, permanent error, timeout, crash,
interrupted, recording gone, gave up after N attempts) can be tested in milliseconds against a
fake worker. Every failed attempt goes through the one RetryPolicy; the store only records.

Several hosts may share one job store: each claim carries a lease that `heartbeat` renews while the
worker runs, and a fencing token that every outcome is recorded under, so a host that lost its
claim (it hung, or lost the database for longer than the lease) cannot overwrite the outcome of the
host that took the job over. `reap_expired` returns the jobs of hosts that stopped renewing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from whisperd.atomic import atomic_write_text, mode_like
from whisperd.audio import probe_duration
from whisperd.config import JobConfig
from whisperd.jobstore import HookEvent, Job, JobStateError, JobStore, JobStoreUnavailable
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
    """What the runner needs of the supervised worker process."""

    def run_job(self, request: JobRequest, timeout: float, tick: Callable[[], bool], *,
                on_progress: Callable[[JobProgress], None]) -> JobOutcome: ...


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
    """Processes claimed jobs one at a time; `current` is the job in progress and `progress` how far
    it is (for status)."""

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
        self.current: Job | None = None
        self.progress: JobProgressEstimate | None = None
        self.on_progress = on_progress  # after each of the worker's progress reports
        self._started_at = 0.0
        self.lease_lost = False
        self._renewed_at = 0.0
        self.configure(jobs)

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
            if self.current is None or job.id != self.current.id:
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
        """Renew the current job's lease, at most every third of the lease. A refused renewal means
        another host took the job back: `lease_lost` makes the job tick stop the worker."""
        job = self.current
        if job is None or time.monotonic() - self._renewed_at < self.store.lease_seconds / 3:
            return
        self._renewed_at = time.monotonic()
        try:
            self.store.renew(job.id, job.token)
        except JobStateError as exc:
            self.lease_lost = True
            log.warning("lease lost: another host has taken this job back; stopping it here",
                        job_id=job.id, path=str(job.path), error=str(exc))
        except JobStoreUnavailable as exc:
            log.warning("cannot renew the job's lease: the job database is unavailable",
                        job_id=job.id, path=str(job.path), error=str(exc))

    def _job_tick(self) -> bool:
        self.heartbeat()
        return self.tick() and not self.lease_lost

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
        """One job's unexpected error (a bug, a database hiccup) must not take the daemon down."""
        self.tick = tick
        try:
            self.process(job, worker, tick)
        except JobStateError as exc:
            self.current = None
            log.warning("job taken over by another host; this attempt's outcome is dropped",
                        job_id=job.id, path=str(job.path), error=str(exc))
        except JobStoreUnavailable as exc:
            self.current = None
            log.warning("job database still unavailable while stopping; the job goes back to the queue "
                        "when this host restarts or its lease expires", job_id=job.id, error=str(exc))
        except Exception as exc:
            self.current = None
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

    def process(self, job: Job, worker: Worker, tick: Callable[[], bool]) -> None:
        self.tick = tick
        self.lease_lost = False
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
        self.current, self.progress = job, None
        self._renewed_at = self._started_at = time.monotonic()  # the claim has just set the lease
        if self.metrics:
            self.metrics.job_started(job)
        self.on_change()
        bound.info("job started", audio_seconds=audio_seconds, attempt=job.attempts + 1,
                   language=options.language, task=options.task, rules=[str(s) for s in rules.sources])
        request = JobRequest(job_id=job.id, path=path, options=options, outputs=rules.outputs,
                             inbox_root=inbox.path if inbox else None,
                             follow_links_outside=bool(inbox and inbox.follow_links_outside),
                             expected=(job.size, job.mtime_ns))
        try:
            outcome = worker.run_job(request, timeout, self._job_tick, on_progress=self._progressed)
        except WorkerStartError as exc:
            outcome = JobOutcome(AttemptOutcome.CRASHED, error=f"the worker could not start: {exc}")
        finally:
            self.current, self.progress = None, None
        self.record(job, outcome, rules)

    def _progressed(self, report: JobProgress) -> None:
        self.progress = JobProgressEstimate(report.position_seconds, report.duration_seconds,
                                            time.monotonic() - self._started_at)
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

    def record(self, job: Job, outcome: JobOutcome, rules: EffectiveRules) -> None:
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
            if self.lease_lost:
                raise JobStateError(f"job {job.id}: the lease was lost during the job")
            self._record(lambda: self.store.requeue(job.id, error="requeued: whisperd stopped during the job",
                                                    token=job.token))
            bound.info("job requeued", result="requeued")
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
