"""One job through the worker, and its outcome into the job store: the state machine of an attempt.

Separate from the daemon's lifecycle (start-up, signals, reload, shutdown: whisperd.service), so
that every path a job can take (done, transient error, permanent error, timeout, crash,
interrupted, recording gone, gave up after N attempts) can be tested in milliseconds against a
fake worker. Every failed attempt goes through the one RetryPolicy; the store only records.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from whisperd.atomic import atomic_write_text, mode_like
from whisperd.audio import probe_duration
from whisperd.config import JobConfig
from whisperd.jobstore import Job, JobStore
from whisperd.logs import get_logger
from whisperd.naming import NameTooLongError, check_name_fits, error_file_for, output_paths, stale_temps_for
from whisperd.options import OUTPUT_FORMATS
from whisperd.protocol import AttemptOutcome, JobOutcome, JobRequest
from whisperd.recording import RecordingRefused, open_recording
from whisperd.retry import RetryPolicy
from whisperd.rules import EffectiveRules, InboxRules, RuleError
from whisperd.supervisor import WorkerStartError

log = get_logger("whisperd.runner")
INTERRUPTED_ERROR = "interrupted: whisperd stopped while this job was running"


class Worker(Protocol):
    """What the runner needs of the supervised worker process."""

    def run_job(self, request: JobRequest, timeout: float, tick: Callable[[], bool]) -> JobOutcome: ...


def remove_stale_temp_outputs(audio: Path) -> None:
    """Temp files a killed worker left for this file's outputs (every format: the rules may have
    changed since the attempt that left them)."""
    for stale in stale_temps_for(audio, OUTPUT_FORMATS):
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
    """Processes claimed jobs one at a time; `current` is the job in progress (for status)."""

    def __init__(self, store: JobStore, jobs: JobConfig, rules: InboxRules,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.rules = rules
        self.on_change = on_change
        self.current: Job | None = None
        self.configure(jobs)

    def configure(self, jobs: JobConfig) -> None:
        """New retry and timeout settings (SIGHUP); they apply from the next attempt."""
        self.jobs = jobs
        self.policy = RetryPolicy(jobs.max_attempts, jobs.retry_backoff_seconds)

    # -- start-up ---------------------------------------------------------------------------

    def recover_interrupted(self) -> int:
        """Jobs left `running` by a daemon that died: each counts as a failed attempt (the file may
        have caused the crash) and goes through the retry policy. Call before any worker starts."""
        interrupted = self.store.running()
        for job in interrupted:
            self._failed_attempt(job, AttemptOutcome.CRASHED, INTERRUPTED_ERROR, permanent=False)
        return len(interrupted)

    # -- one job ----------------------------------------------------------------------------

    def process_guarded(self, job: Job, worker: Worker, tick: Callable[[], bool]) -> None:
        """One job's unexpected error (a bug, a database hiccup) must not take the daemon down."""
        try:
            self.process(job, worker, tick)
        except Exception as exc:
            self.current = None
            log.exception("unexpected error while handling a job", job_id=job.id, path=str(job.path))
            error = f"internal error in whisperd: {type(exc).__name__}: {exc}"
            try:
                current = self.store.get(job.id)
                if current is not None and current.state == "running":
                    try:
                        self.fail(current, error)
                    except Exception:
                        self.store.mark_failed(job.id, error)  # never leave it `running` for ever
            except Exception:
                log.exception("cannot record the failure", job_id=job.id)

    def process(self, job: Job, worker: Worker, tick: Callable[[], bool]) -> None:
        path = job.path
        bound = log.bind(job_id=job.id, path=str(path))
        try:
            st = path.stat()
        except FileNotFoundError:
            self.store.mark_superseded(job.id, "the file was deleted before it was transcribed")
            bound.info("job dropped", result="deleted")
            return
        except OSError as exc:
            self.fail(job, f"{path.name}: cannot read ({exc.strerror or exc})")
            return
        if (st.st_size, st.st_mtime_ns) != (job.size, job.mtime_ns):
            self.store.mark_superseded(job.id, "the file changed; its new version is queued")
            self.store.enqueue(path, st.st_size, st.st_mtime_ns)
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
            self.store.mark_superseded(job.id, "the file was deleted before it was transcribed")
            bound.info("job dropped", result="deleted")
            return
        except RecordingRefused as exc:
            self.fail(job, str(exc))
            return
        timeout = self.jobs.timeout_for(audio_seconds)
        remove_stale_temp_outputs(path)
        self.current = job
        self.on_change()
        bound.info("job started", audio_seconds=audio_seconds, attempt=job.attempts + 1,
                   language=options.language, task=options.task, rules=[str(s) for s in rules.sources])
        request = JobRequest(job_id=job.id, path=path, options=options, outputs=rules.outputs,
                             inbox_root=inbox.path if inbox else None,
                             follow_links_outside=bool(inbox and inbox.follow_links_outside),
                             expected=(job.size, job.mtime_ns))
        try:
            outcome = worker.run_job(request, timeout, tick)
        except WorkerStartError as exc:
            outcome = JobOutcome(AttemptOutcome.CRASHED, error=f"the worker could not start: {exc}")
        finally:
            self.current = None
        self.record(job, outcome, rules)

    def _finished_before_restart(self, job: Job, st: os.stat_result, formats: tuple[str, ...]) -> bool:
        """A job interrupted after its outputs were renamed into place (killed before it was recorded
        done) is recorded done now instead of being run again: its complete output set is there and
        newer than the recording. A partial set (killed between two renames) is redone."""
        interrupted = job.attempts > 0 or job.last_error is not None
        if not interrupted or not outputs_up_to_date(job.path, st, formats):
            return False
        outputs = [str(p) for p in output_paths(job.path, formats).values()]
        self.store.mark_done(job.id, None, None, None, extra={
            "outputs": outputs, "note": "outputs were already in place from the interrupted attempt"})
        remove_error_note(job.path)
        log.info("job done", job_id=job.id, path=str(job.path), result="already_written")
        self.on_change()
        return True

    # -- recording the outcome --------------------------------------------------------------

    def record(self, job: Job, outcome: JobOutcome, rules: EffectiveRules) -> None:
        bound = log.bind(job_id=job.id, path=str(job.path))
        if outcome.kind is AttemptOutcome.DONE and outcome.done is not None:
            done = outcome.done
            self.store.mark_done(job.id, done.audio_seconds, done.wall_seconds, done.language,
                                 extra={"outputs": list(done.outputs), "worker_pid": done.pid,
                                        "worker_jobs_done": done.jobs_done,
                                        "language_probability": done.language_probability,
                                        "rules": [str(s) for s in rules.sources]})
            remove_error_note(job.path)
            bound.info("job done", result="done", audio_seconds=round(done.audio_seconds, 2),
                       wall_seconds=round(done.wall_seconds, 2), language=done.language,
                       worker_pid=done.pid, segments=done.segments)
        elif outcome.kind is AttemptOutcome.GONE:
            self.store.mark_superseded(job.id, outcome.error)
            bound.info("job dropped", result="gone", error=outcome.error)
        elif outcome.kind is AttemptOutcome.INTERRUPTED:
            remove_stale_temp_outputs(job.path)
            self.store.requeue(job.id, error="requeued: whisperd stopped during the job")
            bound.info("job requeued", result="requeued")
        else:
            self._failed_attempt(job, outcome.kind, outcome.error, permanent=outcome.permanent)
        self.on_change()

    def _failed_attempt(self, job: Job, kind: AttemptOutcome, error: str, *, permanent: bool) -> None:
        remove_stale_temp_outputs(job.path)
        decision = self.policy.decide(error, permanent=permanent, failed_attempts=job.attempts + 1)
        if not decision.retry:
            self.fail(job, decision.error)
            return
        self.store.mark_retry(job.id, decision.error, decision.delay_seconds)
        log.warning("job will be retried", job_id=job.id, path=str(job.path), result=kind.value,
                    error=decision.error, attempt=job.attempts + 1, retry_in_seconds=decision.delay_seconds)

    def fail(self, job: Job, error: str) -> None:
        """Tell the user next to the file (removed again when a later run succeeds), then mark failed.

        The note comes first, so that whoever sees `failed` in the job store or the log finds it.
        """
        attempts = job.attempts + 1  # mark_failed counts the failing attempt
        remove_stale_temp_outputs(job.path)
        write_error_note(job.path, error, attempts)
        failed = self.store.mark_failed(job.id, error)
        log.error("job failed", job_id=job.id, path=str(job.path), result="failed", error=error,
                  attempts=failed.attempts)
        self.on_change()
