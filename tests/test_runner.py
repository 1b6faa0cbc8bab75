"""The job runner's state machine against a fake worker: every outcome of an attempt, in milliseconds.

The fake stands in for the worker *process* only (its model and inference are covered end to end
by the daemon tests); the job store, the rules, the recording checks and the retry policy are the
real ones.
"""

from __future__ import annotations

import os
import time
import wave
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from whisperd.config import DaemonConfig, JobConfig
from whisperd.jobstore import Job, JobStateError, JobStore, JobStoreUnavailable, SqliteJobStore
from whisperd.naming import error_file_for
from whisperd.protocol import AttemptOutcome, JobDone, JobOutcome, JobProgress, JobRequest
from whisperd.retry import RetryPolicy
from whisperd.rules import InboxRules
from whisperd.runner import JobRunner
from whisperd.service import Daemon
from whisperd.supervisor import WorkerStartError

JOBS = JobConfig(max_attempts=3, retry_backoff_seconds=10.0)


class OneJobAtATime:
    """The supervisor's submit/poll over a fake's `run_job`: each job runs as it is submitted (an
    exception from it is what a failed worker start raises) and its outcome comes from the next poll."""

    def __init__(self) -> None:
        self.outcomes: dict[int, JobOutcome] = {}

    def submit(self, request: JobRequest, timeout: float, tick: Callable[[], bool], *,
               on_progress: Callable[[JobProgress], None]) -> None:
        self.outcomes[request.job_id] = self.run_job(request, timeout, tick, on_progress=on_progress)

    def poll(self, tick: Callable[[], bool]) -> dict[int, JobOutcome]:
        outcomes, self.outcomes = self.outcomes, {}
        return outcomes

    def run_job(self, request: JobRequest, timeout: float, tick: Callable[[], bool], *,
                on_progress: Callable[[JobProgress], None]) -> JobOutcome:
        raise NotImplementedError


class FakeWorker(OneJobAtATime):
    """Answers each job with the next outcome from a script (or raises it)."""

    def __init__(self, *script: JobOutcome | Exception) -> None:
        super().__init__()
        self.script = list(script)
        self.requests: list[JobRequest] = []

    def run_job(self, request: JobRequest, timeout: float, tick: Callable[[], bool], *,
                on_progress: Callable[[JobProgress], None]) -> JobOutcome:
        self.requests.append(request)
        outcome = self.script.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def done(request_path: Path) -> JobOutcome:
    return JobOutcome(AttemptOutcome.DONE, done=JobDone(
        job_id=0, pid=1234, jobs_done=1, audio_seconds=1.0, wall_seconds=0.1, language="en",
        language_probability=0.9, segments=1, outputs=(str(request_path.with_suffix(".txt")),)))


def error(kind: AttemptOutcome = AttemptOutcome.ERROR, permanent: bool = False, text: str = "boom") -> JobOutcome:
    return JobOutcome(kind, error=text, permanent=permanent)


def write_wav(path: Path, seconds: float = 1.0) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(b"\0\1" * int(16000 * seconds))
    return path


@pytest.fixture()
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


@pytest.fixture()
def store(tmp_path: Path) -> JobStore:
    s = SqliteJobStore(tmp_path / "jobs.sqlite3")
    yield s
    s.close()


def make_runner(store: JobStore, inbox: Path, jobs: JobConfig = JOBS) -> JobRunner:
    config = DaemonConfig.model_validate({"inboxes": [{"path": str(inbox)}], "jobs": jobs.model_dump()})
    return JobRunner(store, config.jobs, InboxRules(config.inboxes))


def queue(store: JobStore, path: Path) -> Job:
    st = path.stat()
    store.enqueue(path, st.st_size, st.st_mtime_ns)
    job = store.claim_next()
    assert job is not None
    return job


def attempt(runner: JobRunner, store: JobStore, worker: FakeWorker, path: Path) -> Job:
    """Claim `path`'s job (whenever its backoff allows), run it once, return the row after."""
    job = store.claim_next(now=1e12)
    assert job is not None and job.path == path
    runner.process_guarded(job, worker, lambda: True)
    after = store.get(job.id)
    assert after is not None
    return after


def test_done_records_the_run_and_removes_an_old_note(store: JobStore, inbox: Path) -> None:
    audio = write_wav(inbox / "talk.wav")
    error_file_for(audio).write_text("an earlier failure")
    runner = make_runner(store, inbox)
    job = queue(store, audio)
    worker = FakeWorker(done(audio))
    runner.process_guarded(job, worker, lambda: True)
    row = store.get(job.id)
    assert row is not None and row.state == "done" and row.language == "en"
    assert row.extra["outputs"] == [str(audio.with_suffix(".txt"))]
    assert not error_file_for(audio).exists()
    [request] = worker.requests
    assert request.expected == (audio.stat().st_size, audio.stat().st_mtime_ns)
    assert request.inbox_root == inbox and request.outputs == ("txt", "srt")


class ReportingWorker(OneJobAtATime):
    """Reports `positions` (of a 1 s file) as the real worker does, then answers done."""

    def __init__(self, *positions: float) -> None:
        super().__init__()
        self.positions = positions

    def run_job(self, request: JobRequest, timeout: float, tick: Callable[[], bool], *,
                on_progress: Callable[[JobProgress], None]) -> JobOutcome:
        for position in self.positions:
            on_progress(JobProgress(request.job_id, position, 1.0))
        return done(request.path)


def test_the_workers_progress_is_kept_for_status_while_the_job_runs(store: JobStore, inbox: Path) -> None:
    audio = write_wav(inbox / "talk.wav")
    runner = make_runner(store, inbox)
    job = queue(store, audio)
    seen: list[tuple[int, float, float | None]] = []

    def keep() -> None:
        assert runner.current is not None and runner.progress is not None
        seen.append((runner.current.id, runner.progress.percent, runner.progress.eta_seconds))

    runner.on_progress = keep
    runner.process_guarded(job, ReportingWorker(0.0, 0.5), lambda: True)
    assert [(job_id, percent) for job_id, percent, _ in seen] == [(job.id, 0.0), (job.id, 50.0)]
    assert seen[0][2] is None and seen[1][2] is not None and seen[1][2] > 0
    assert runner.progress is None and runner.current is None, "a finished job leaves no progress behind"


class SideBySideWorker:
    """Holds every job it is sent until the next poll, then answers them all, the last sent first:
    the worker process running several jobs at once (their windows in shared batches)."""

    def __init__(self, outcome_for: Callable[[JobRequest], JobOutcome]) -> None:
        self.outcome_for = outcome_for
        self.in_worker: list[JobRequest] = []
        self.together: list[list[str]] = []  # the names in the worker at each poll
        self.report: dict[int, Callable[[JobProgress], None]] = {}  # each job's progress callback

    def submit(self, request: JobRequest, timeout: float, tick: Callable[[], bool], *,
               on_progress: Callable[[JobProgress], None]) -> None:
        self.in_worker.append(request)
        self.report[request.job_id] = on_progress

    def poll(self, tick: Callable[[], bool]) -> dict[int, JobOutcome]:
        held, self.in_worker = self.in_worker, []
        self.together.append([r.path.name for r in held])
        return {r.job_id: self.outcome_for(r) for r in reversed(held)}


def run_queue(runner: JobRunner, store: JobStore, worker: SideBySideWorker) -> None:
    """What the daemon's main loop does: claim while the worker has room, else wait on it."""
    while True:
        while runner.has_room() and (job := store.claim_next(now=1e12)) is not None:
            runner.start_guarded(job, worker)
        if not runner.busy:
            return
        runner.collect(worker)


def test_jobs_side_by_side_are_each_recorded_on_their_own(store: JobStore, inbox: Path) -> None:
    names = ["a.wav", "b.wav", "c.wav", "bad.wav", "d.wav"]
    for name in names:
        path = write_wav(inbox / name)
        store.enqueue(path, path.stat().st_size, path.stat().st_mtime_ns)
    runner = make_runner(store, inbox)
    runner.at_once = 3

    def outcome_for(request: JobRequest) -> JobOutcome:
        if request.path.name == "bad.wav":
            return error(permanent=True, text="bad.wav: not an audio file")
        return done(request.path)

    worker = SideBySideWorker(outcome_for)
    run_queue(runner, store, worker)
    assert worker.together == [["a.wav", "b.wav", "c.wav"], ["bad.wav", "d.wav"]]
    for name in names:
        [row] = store.history_for_path(inbox / name)
        assert row.state == ("failed" if name == "bad.wav" else "done"), (name, row.state)
        assert row.attempts == (1 if name == "bad.wav" else 0)
        if row.state == "done":
            assert row.extra["outputs"] == [str((inbox / name).with_suffix(".txt"))]
    assert "not an audio file" in error_file_for(inbox / "bad.wav").read_text()
    assert not error_file_for(inbox / "a.wav").exists()
    assert not runner.running and runner.current is None


def test_a_job_that_failed_before_waits_for_the_worker_to_empty_and_runs_alone(store: JobStore, inbox: Path) -> None:
    first, suspect, later = (write_wav(inbox / n) for n in ("first.wav", "suspect.wav", "later.wav"))
    for path in (first, suspect, later):
        store.enqueue(path, path.stat().st_size, path.stat().st_mtime_ns)
    claimed = [store.claim_next(), store.claim_next()]
    assert [j.path for j in claimed if j] == [first, suspect]
    store.requeue(claimed[0].id, error="requeued", token=claimed[0].token)  # type: ignore[union-attr]
    # The suspect was in a worker that crashed: one failed attempt, retried at once.
    store.mark_retry(claimed[1].id, "the worker process died during the job", 0, token=claimed[1].token)  # type: ignore[union-attr]
    runner = make_runner(store, inbox)
    runner.at_once = 3
    worker = SideBySideWorker(lambda request: done(request.path))
    run_queue(runner, store, worker)
    assert worker.together == [["first.wav"], ["suspect.wav"], ["later.wav"]]
    for path in (first, suspect, later):
        assert store.latest_for_path(path).state == "done"  # type: ignore[union-attr]


def test_jobs_beside_one_that_timed_out_go_back_to_the_queue_uncounted(store: JobStore, inbox: Path) -> None:
    late, beside = write_wav(inbox / "late.wav"), write_wav(inbox / "beside.wav")
    for path in (late, beside):
        store.enqueue(path, path.stat().st_size, path.stat().st_mtime_ns)
    runner = make_runner(store, inbox)
    runner.at_once = 2
    reason = "requeued: the worker was restarted because late.wav ran past its timeout"

    def outcome_for(request: JobRequest) -> JobOutcome:  # what WorkerSupervisor._timed_out hands back
        if request.path == late:
            return error(AttemptOutcome.TIMEOUT, text="the job ran past its 300 s timeout; the worker was restarted")
        return error(AttemptOutcome.INTERRUPTED, text=reason)

    worker = SideBySideWorker(outcome_for)
    for _ in range(2):
        job = store.claim_next(now=1e12)
        assert job is not None
        runner.start_guarded(job, worker)
    runner.collect(worker)
    late_row, beside_row = store.latest_for_path(late), store.latest_for_path(beside)
    assert late_row is not None and (late_row.state, late_row.attempts) == ("queued", 1)
    assert beside_row is not None and (beside_row.state, beside_row.attempts, beside_row.last_error) == (
        "queued", 0, reason)


def test_transient_errors_are_retried_with_backoff_then_given_up(store: JobStore, inbox: Path) -> None:
    audio = write_wav(inbox / "talk.wav")
    runner = make_runner(store, inbox)
    store.enqueue(audio, audio.stat().st_size, audio.stat().st_mtime_ns)
    worker = FakeWorker(error(), error(AttemptOutcome.TIMEOUT), error(AttemptOutcome.CRASHED))
    first = attempt(runner, store, worker, audio)
    assert (first.state, first.attempts) == ("queued", 1)
    assert first.not_before - (first.finished_at or 0) >= 0 and first.not_before > 0
    second = attempt(runner, store, worker, audio)
    assert (second.state, second.attempts) == ("queued", 2)
    third = attempt(runner, store, worker, audio)
    assert (third.state, third.attempts) == ("failed", 3)
    assert "gave up after 3 attempts" in (third.last_error or "")
    assert "gave up after 3 attempts" in error_file_for(audio).read_text()


def test_backoff_doubles() -> None:
    policy = RetryPolicy(max_attempts=4, backoff_seconds=10)
    assert [policy.decide("x", permanent=False, failed_attempts=n).delay_seconds for n in (1, 2, 3)] == [10, 20, 40]
    assert not policy.decide("x", permanent=False, failed_attempts=4).retry
    assert not policy.decide("x", permanent=True, failed_attempts=1).retry


def test_a_permanent_error_fails_at_once_with_a_note(store: JobStore, inbox: Path) -> None:
    audio = write_wav(inbox / "talk.wav")
    runner = make_runner(store, inbox)
    job = queue(store, audio)
    runner.process_guarded(job, FakeWorker(error(permanent=True, text="talk.wav: not an audio file")), lambda: True)
    row = store.get(job.id)
    assert row is not None and (row.state, row.attempts) == ("failed", 1)
    assert "not an audio file" in error_file_for(audio).read_text()


def test_a_worker_that_cannot_start_counts_as_a_crash(store: JobStore, inbox: Path) -> None:
    audio = write_wav(inbox / "talk.wav")
    runner = make_runner(store, inbox)
    job = queue(store, audio)
    runner.process_guarded(job, FakeWorker(WorkerStartError("out of memory")), lambda: True)
    row = store.get(job.id)
    assert row is not None and (row.state, row.attempts) == ("queued", 1)
    assert "could not start" in (row.last_error or "")


def test_interrupted_jobs_go_back_uncounted(store: JobStore, inbox: Path) -> None:
    audio = write_wav(inbox / "talk.wav")
    runner = make_runner(store, inbox)
    for _ in range(5):  # five service stops during this job
        job = store.claim_next() or queue(store, audio)
        runner.process_guarded(job, FakeWorker(error(AttemptOutcome.INTERRUPTED)), lambda: True)
    row = store.get(job.id)
    assert row is not None and (row.state, row.attempts, row.not_before) == ("queued", 0, 0)


def test_a_recording_gone_mid_job_is_dropped_without_a_note(store: JobStore, inbox: Path) -> None:
    audio = write_wav(inbox / "talk.wav")
    runner = make_runner(store, inbox)
    job = queue(store, audio)
    runner.process_guarded(job, FakeWorker(error(AttemptOutcome.GONE, permanent=True, text="talk.wav was deleted")),
                   lambda: True)
    row = store.get(job.id)
    assert row is not None and row.state == "superseded" and not error_file_for(audio).exists()


def test_a_file_that_keeps_crashing_the_worker_ends_failed_and_the_queue_moves_on(store: JobStore,
                                                                                   inbox: Path) -> None:
    poison, good = write_wav(inbox / "poison.wav"), write_wav(inbox / "good.wav")
    runner = make_runner(store, inbox)
    for path in (poison, good):
        store.enqueue(path, path.stat().st_size, path.stat().st_mtime_ns)
    worker = FakeWorker(*[error(AttemptOutcome.CRASHED, text="worker died (SIGSEGV)")] * 3, done(good))
    states = [attempt(runner, store, worker, poison).state for _ in range(3)]
    assert states == ["queued", "queued", "failed"]
    assert attempt(runner, store, worker, good).state == "done"


def test_start_up_recovery_counts_the_interrupted_attempt_through_the_policy(store: JobStore, inbox: Path) -> None:
    once, twice = write_wav(inbox / "once.wav"), write_wav(inbox / "twice.wav")
    runner = make_runner(store, inbox, JobConfig(max_attempts=2, retry_backoff_seconds=0))
    for path in (once, twice):
        queue(store, path)
    store.mark_retry(store.running()[1].id, "an earlier crash", 0)  # twice.wav failed once already
    assert store.claim_next() is not None
    assert runner.recover_interrupted() == 2
    rows = {Path(j.path).name: j for j in (store.get(1), store.get(2)) if j is not None}
    assert (rows["once.wav"].state, rows["once.wav"].attempts) == ("queued", 1)
    assert "interrupted" in (rows["once.wav"].last_error or "")
    assert (rows["twice.wav"].state, rows["twice.wav"].attempts) == ("failed", 2)
    assert "gave up after 2 attempts" in (rows["twice.wav"].last_error or "")
    assert runner.recover_interrupted() == 0


def test_rule_errors_and_refused_links_fail_before_the_worker_is_asked(store: JobStore, inbox: Path,
                                                                       tmp_path: Path) -> None:
    (inbox / "broken").mkdir()
    (inbox / "broken" / ".whisperd.yaml").write_text("task: sing\n")
    broken = write_wav(inbox / "broken" / "talk.wav")
    outside = write_wav(tmp_path / "secret.wav")
    (inbox / "escape.wav").symlink_to(outside)
    runner = make_runner(store, inbox)
    worker = FakeWorker()
    for path in (broken, inbox / "escape.wav"):
        job = queue(store, path)
        runner.process_guarded(job, worker, lambda: True)
        assert store.get(job.id).state == "failed"  # type: ignore[union-attr]
    assert worker.requests == []
    assert "task" in error_file_for(broken).read_text()


class FakeSupervisor:
    """Stands in for WorkerSupervisor in the daemon's engine switch (model 'broken' cannot load), so the
    decision logic runs in milliseconds; the same switch with a real worker process is
    tests/test_hostile_inbox.py::test_reload_into_an_engine_that_cannot_load_keeps_the_old_one."""

    started: list[str] = []

    def __init__(self, settings, log_format: str, log_level: str) -> None:  # noqa: ANN001
        self.settings = settings
        self.running = False
        self.ready_info = None
        self.starts = 0
        self.pid = None

    def start(self, tick: Callable[[], bool]) -> None:
        FakeSupervisor.started.append(self.settings.model)
        if self.settings.model == "broken":
            raise WorkerStartError("no such model: broken")
        self.running = True

    def alive(self) -> bool:
        return self.running

    def stop(self) -> None:
        self.running = False


def test_reload_into_an_engine_that_cannot_load_keeps_the_old_one(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("whisperd.service.WorkerSupervisor", FakeSupervisor)
    FakeSupervisor.started = []
    config = tmp_path / "whisperd.yaml"
    (tmp_path / "inbox").mkdir()
    settings = {"inboxes": [{"path": "inbox"}], "state_dir": "state", "engine": {"model": "good"}}
    config.write_text(yaml.safe_dump(settings))
    daemon = Daemon(config)
    assert daemon._start_worker(daemon.config.engine) is None
    old = daemon.config.engine
    settings["engine"] = {"model": "broken"}
    config.write_text(yaml.safe_dump(settings))
    daemon.config = daemon.config.model_copy(update={"engine": daemon.config.engine.model_copy(update={"model": "broken"})})
    daemon._switch_engine(old)
    assert daemon.config.engine.model == "good"
    assert daemon._ensure_worker() and daemon.supervisor.settings.model == "good"  # type: ignore[union-attr]
    assert FakeSupervisor.started == ["good", "broken", "good"]
    assert daemon.exit_code == 0 and not daemon.stop_requested
    os.environ.pop("NOTIFY_SOCKET", None)


# -- several hosts on one job store ---------------------------------------------------------------


class TickingWorker(OneJobAtATime):
    """Runs each job for `ticks` ticks (the supervisor ticks about twice a second), then answers;
    stops early, like the supervisor, when the tick says so."""

    def __init__(self, outcome: Callable[[Path], JobOutcome], ticks: int = 6, pause: float = 0.05) -> None:
        super().__init__()
        self.outcome, self.ticks, self.pause = outcome, ticks, pause
        self.interrupted = False

    def run_job(self, request: JobRequest, timeout: float, tick: Callable[[], bool], *,
                on_progress: Callable[[JobProgress], None]) -> JobOutcome:
        for _ in range(self.ticks):
            time.sleep(self.pause)
            if not tick():
                self.interrupted = True
                return JobOutcome(AttemptOutcome.INTERRUPTED, error="the daemon stopped during the job")
        return self.outcome(request.path)


def host(tmp_path: Path, inbox: Path, name: str, lease: float = 120.0,
         jobs: JobConfig = JOBS) -> tuple[SqliteJobStore, JobRunner]:
    """Another host on the same job database (two stores on one file stand for two machines)."""
    store = SqliteJobStore(tmp_path / "jobs.sqlite3", host_id=name, inboxes={"in": inbox}, lease_seconds=lease)
    return store, make_runner(store, inbox, jobs)


def test_a_restarted_host_requeues_only_its_own_jobs_and_takes_back_others_after_their_lease(
        tmp_path: Path, inbox: Path) -> None:
    mine, theirs = write_wav(inbox / "mine.wav"), write_wav(inbox / "theirs.wav")
    a_store, a = host(tmp_path, inbox, "host-a", lease=1.0)
    b_store, b = host(tmp_path, inbox, "host-b", lease=1.0)
    queue(a_store, mine)
    queue(b_store, theirs)
    # host a restarts: its own claim is interrupted (counted), host b's is left alone...
    assert a.recover_interrupted() == 1
    rows = {j.path.name: j for j in a_store.history_for_path(mine) + a_store.history_for_path(theirs)}
    assert (rows["mine.wav"].state, rows["mine.wav"].attempts) == ("queued", 1)
    assert (rows["theirs.wav"].state, rows["theirs.wav"].owner) == ("running", "host-b")
    assert a.reap_expired() == 0  # host b's lease still runs
    time.sleep(1.2)  # ... until host b stops renewing it
    assert a.reap_expired() == 1
    back = a_store.latest_for_path(theirs)
    assert back is not None and (back.state, back.attempts) == ("queued", 1)
    assert "host-b stopped renewing its lease" in (back.last_error or "")
    # host b comes back and reports its result: fenced off, recorded nowhere, and no exception
    with pytest.raises(JobStateError):
        b_store.mark_done(back.id, 1.0, 1.0, "en", token=back.token)


def test_the_lease_is_renewed_while_the_worker_runs(tmp_path: Path, inbox: Path) -> None:
    audio = write_wav(inbox / "talk.wav")
    a_store, a = host(tmp_path, inbox, "host-a", lease=0.3)
    b_store, b = host(tmp_path, inbox, "host-b", lease=0.3)
    job = queue(a_store, audio)
    seen_expired: list[int] = []

    def finish(path: Path) -> JobOutcome:
        seen_expired.extend(j.id for j in b_store.expired())
        return done(path)

    a.process_guarded(job, TickingWorker(finish, ticks=12), lambda: True)  # 0.6 s: twice the lease
    row = a_store.get(job.id)
    assert row is not None and (row.state, row.attempts, row.owner) == ("done", 0, "host-a")
    assert seen_expired == [], "host b saw the running job's lease expire"


def test_a_host_that_lost_its_lease_stops_the_job_and_records_nothing(tmp_path: Path, inbox: Path) -> None:
    audio = write_wav(inbox / "talk.wav")
    a_store, a = host(tmp_path, inbox, "host-a", lease=0.3)
    b_store, b = host(tmp_path, inbox, "host-b", lease=0.3)
    job = queue(a_store, audio)
    later = time.time() + 1  # host a's lease has run out by then
    b_store.mark_retry(job.id, "host-a stopped renewing", 0, token=job.token, now=later, expired=True)
    taken = b_store.claim_next(now=later)
    assert taken is not None and taken.token == job.token + 1
    worker = TickingWorker(done, ticks=20)
    a.process_guarded(job, worker, lambda: True)
    assert worker.interrupted and a.lease_lost
    row = b_store.get(job.id)
    assert row is not None and (row.state, row.owner, row.token) == ("running", "host-b", taken.token)
    b.process_guarded(taken, FakeWorker(done(audio)), lambda: True)
    assert b_store.get(job.id).state == "done"  # type: ignore[union-attr]


class FlakyStore:
    """The real store, but the database is 'down' for the first `outage` calls of the named methods."""

    def __init__(self, store: JobStore, outage: int, methods: tuple[str, ...] = ("mark_done", "renew")) -> None:
        self._store, self.outage, self.methods, self.refused = store, outage, methods, 0

    def __getattr__(self, name: str):  # noqa: ANN204
        attr = getattr(self._store, name)
        if name not in self.methods:
            return attr

        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if self.refused < self.outage:
                self.refused += 1
                raise JobStoreUnavailable("connection refused")
            return attr(*args, **kwargs)
        return call


def test_an_outcome_waits_for_the_database_and_is_recorded_once_it_is_back(
        store: JobStore, inbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("whisperd.runner.RECORD_BACKOFF_FIRST_S", 0.01)
    audio = write_wav(inbox / "talk.wav")
    flaky = FlakyStore(store, outage=4)
    runner = make_runner(flaky, inbox)  # type: ignore[arg-type]
    job = queue(store, audio)
    ticks: list[float] = []
    runner.process_guarded(job, FakeWorker(done(audio)), lambda: ticks.append(time.monotonic()) or True)
    row = store.get(job.id)
    assert row is not None and (row.state, row.attempts) == ("done", 0)
    assert flaky.refused == 4 and ticks, "the daemon's tick (watchdog) ran while waiting"


def test_a_stop_while_the_database_is_down_leaves_the_claim_to_its_lease(
        store: JobStore, inbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("whisperd.runner.RECORD_BACKOFF_FIRST_S", 0.01)
    audio = write_wav(inbox / "talk.wav")
    runner = make_runner(FlakyStore(store, outage=10**6), inbox)  # type: ignore[arg-type]
    job = queue(store, audio)
    runner.process_guarded(job, FakeWorker(done(audio)), lambda: False)  # stopping, deadline passed
    row = store.get(job.id)
    assert row is not None and row.state == "running"  # recovered at restart, or by another host's reaping


def test_a_claim_whose_reply_was_lost_goes_back_uncounted(store: JobStore, inbox: Path) -> None:
    audio = write_wav(inbox / "talk.wav")
    runner = make_runner(store, inbox)
    job = queue(store, audio)  # claimed, but the daemon never got the row (the connection broke)
    assert runner.reap_expired() == 0  # none expired
    row = store.get(job.id)
    assert row is not None and (row.state, row.attempts) == ("queued", 0)


def test_status_names_the_first_job_in_the_worker_and_counts_the_others(tmp_path: Path, store: JobStore,
                                                                        inbox: Path) -> None:
    config = tmp_path / "whisperd.yaml"
    config.write_text(yaml.safe_dump({"inboxes": [{"path": str(inbox)}], "state_dir": str(tmp_path / "state")}))
    daemon = Daemon(config)
    daemon.runner = runner = make_runner(store, inbox)
    runner.at_once = 3
    for name in ("standup.m4a", "review.m4a", "retro.m4a"):
        path = write_wav(inbox / name)
        store.enqueue(path, path.stat().st_size, path.stat().st_mtime_ns)
    worker = SideBySideWorker(lambda request: done(request.path))
    while runner.has_room() and (job := store.claim_next(now=1e12)) is not None:
        runner.start_guarded(job, worker)
    first = min(runner.running)
    worker.report[first](JobProgress(first, 0.42, 1.0))
    assert daemon._running_text().startswith("transcribing standup.m4a: 42% (eta ")
    assert daemon._running_text().endswith(" and 2 more")
    assert [job["path"] for job in daemon._running_jobs()] == [str(inbox / n) for n in ("standup.m4a", "review.m4a",
                                                                                         "retro.m4a")]
    runner.collect(worker)
    assert daemon._running_text() == "idle" and daemon._running_jobs() == []
