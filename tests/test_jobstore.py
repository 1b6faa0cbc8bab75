"""Tests for the SQLite job store: identity, claiming, retries, crash recovery, persistence."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from whisperd.jobstore import (
    SCHEMA_VERSION,
    STATES,
    Job,
    JobStateError,
    JobStore,
    JobStoreError,
)

pytestmark = pytest.mark.timeout(60)

T0 = 1_700_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    s = JobStore(tmp_path / "state" / "jobs.sqlite3")
    yield s
    s.close()


def _enqueue(store: JobStore, path: str = "/in/talk.wav", size: int = 100, mtime_ns: int = 1, **kw) -> Job:
    job = store.enqueue(path, size, mtime_ns, **kw)
    assert job is not None
    return job


# -- schema and persistence -------------------------------------------------------------------


def test_creates_wal_database_with_schema_version(tmp_path: Path) -> None:
    db = tmp_path / "state" / "jobs.sqlite3"
    with JobStore(db) as store:
        assert store.schema_version == SCHEMA_VERSION
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    raw.close()


def test_refuses_database_from_newer_version(tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite3"
    raw = sqlite3.connect(db)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(JobStoreError, match="newer"):
        JobStore(db)


def test_state_persists_across_reopen(tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite3"
    with JobStore(db) as store:
        a = _enqueue(store, "/in/a.wav")
        b = _enqueue(store, "/in/b.wav")
        _enqueue(store, "/in/c.wav")
        claimed = store.claim_next()
        assert claimed is not None and claimed.id == a.id
        store.mark_done(a.id, audio_seconds=60.0, wall_seconds=6.0, language="en", extra={"outputs": ["txt"]})
        store.mark_failed(b.id, "decode error")
    with JobStore(db) as store:
        assert store.counts() == {"queued": 1, "running": 0, "done": 1, "failed": 1, "superseded": 0}
        done = store.get(a.id)
        assert done is not None
        assert (done.state, done.audio_seconds, done.wall_seconds, done.language) == ("done", 60.0, 6.0, "en")
        assert done.extra == {"outputs": ["txt"]}
        assert store.enqueue("/in/a.wav", 100, 1) is None  # still known after reopen
        assert store.recent_failures(5)[0].last_error == "decode error"


# -- identity ---------------------------------------------------------------------------------


def test_same_identity_is_not_enqueued_twice_in_any_state(store: JobStore) -> None:
    job = _enqueue(store)
    assert (job.state, job.attempts, job.size, job.mtime_ns) == ("queued", 0, 100, 1)
    assert job.path == Path("/in/talk.wav")
    assert store.enqueue("/in/talk.wav", 100, 1) is None  # queued
    store.claim_next()
    assert store.enqueue("/in/talk.wav", 100, 1) is None  # running
    store.mark_done(job.id, 1.0, 1.0, "en")
    assert store.enqueue(Path("/in/talk.wav"), 100, 1) is None  # done
    other = _enqueue(store, "/in/other.wav")
    store.claim_next()
    store.mark_failed(other.id, "boom")
    assert store.enqueue("/in/other.wav", 100, 1) is None  # failed
    assert store.counts()["queued"] == 0


def test_replaced_file_is_a_new_job_and_history_is_kept(store: JobStore) -> None:
    first = _enqueue(store, size=100, mtime_ns=1)
    store.claim_next()
    store.mark_done(first.id, 1.0, 1.0, "en")
    bigger = _enqueue(store, size=200, mtime_ns=1)  # new size
    newer = _enqueue(store, size=200, mtime_ns=2)  # new mtime
    assert len({first.id, bigger.id, newer.id}) == 3
    history = store.history_for_path("/in/talk.wav")
    assert [(j.id, j.state) for j in history] == [
        (first.id, "done"),  # history kept as it was
        (bigger.id, "superseded"),  # queued but replaced before it ran: would transcribe stale content
        (newer.id, "queued"),
    ]
    assert history[1].last_error == f"superseded by job {newer.id}"
    latest = store.latest_for_path("/in/talk.wav")
    assert latest is not None and latest.id == newer.id
    assert store.latest_for_path("/in/none.wav") is None


def test_superseded_identity_that_comes_back_is_revived(store: JobStore) -> None:
    a = _enqueue(store, size=100, mtime_ns=1)
    b = _enqueue(store, size=200, mtime_ns=2)
    assert store.get(a.id).state == "superseded"  # type: ignore[union-attr]
    revived = store.enqueue("/in/talk.wav", 100, 1)  # the old version restored (cp -p)
    assert revived is not None and revived.id == a.id and revived.state == "queued"
    assert store.get(b.id).state == "superseded"  # type: ignore[union-attr]
    assert store.counts()["queued"] == 1


def test_relative_and_non_utf8_paths(store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    job = _enqueue(store, "rel.wav")
    assert job.path == tmp_path / "rel.wav"  # stored absolute
    latin1 = os.fsdecode(b"/in/caf\xe9.wav")  # not valid UTF-8 (a Latin-1 name on a share)
    odd = _enqueue(store, latin1)
    assert os.fsencode(odd.path) == b"/in/caf\xe9.wav"
    assert store.enqueue(latin1, 100, 1) is None
    assert store.latest_for_path(latin1).id == odd.id  # type: ignore[union-attr]


# -- claiming ---------------------------------------------------------------------------------


def test_claim_oldest_first_and_respects_not_before(store: JobStore) -> None:
    a = _enqueue(store, "/in/a.wav", now=T0)
    b = _enqueue(store, "/in/b.wav", now=T0 + 1)
    ca = store.claim_next(now=T0 + 2, worker_pid=4242)
    assert ca is not None and ca.id == a.id and ca.state == "running"
    assert (ca.started_at, ca.worker_pid) == (T0 + 2, 4242)
    retried = store.mark_retry(a.id, "timeout", backoff_s=30, now=T0 + 3)
    assert (retried.state, retried.attempts, retried.not_before) == ("queued", 1, T0 + 33)
    assert store.next_claimable_at() == 0  # b is claimable right away
    cb = store.claim_next(now=T0 + 4)
    assert cb is not None and cb.id == b.id  # a is backing off
    assert store.claim_next(now=T0 + 10) is None
    assert store.next_claimable_at() == T0 + 33
    again = store.claim_next(now=T0 + 33)
    assert again is not None and again.id == a.id and again.attempts == 1
    assert again.last_error == "timeout"
    assert store.claim_next(now=T0 + 100) is None
    assert store.next_claimable_at() is None


def test_running_lists_claimed_jobs(store: JobStore) -> None:
    for i in range(3):
        _enqueue(store, f"/in/{i}.wav")
    first = store.claim_next(now=T0)
    second = store.claim_next(now=T0 + 1)
    assert [j.id for j in store.running()] == [first.id, second.id]  # type: ignore[union-attr]
    assert len(store.queued()) == 1


def test_state_changes_are_checked(store: JobStore) -> None:
    job = _enqueue(store)
    with pytest.raises(JobStateError, match="is queued"):
        store.mark_done(job.id, 1.0, 1.0, "en")
    with pytest.raises(JobStateError, match="does not exist"):
        store.mark_retry(999, "x", 1)
    store.claim_next()
    store.mark_retry(job.id, "interrupted", 0)  # recovery took it back: the old claimer must not mark it done
    with pytest.raises(JobStateError):
        store.mark_done(job.id, 1.0, 1.0, "en")
    store.mark_failed(job.id, "broken rule file")  # allowed from queued
    assert store.get(job.id).state == "failed"  # type: ignore[union-attr]


def test_claim_is_exclusive_across_threads(store: JobStore) -> None:
    n = 200
    for i in range(n):
        _enqueue(store, f"/in/{i:03}.wav")
    claimed: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def claimer() -> None:
        start.wait()
        while (job := store.claim_next()) is not None:
            with lock:
                claimed.append(job.id)
            store.mark_done(job.id, 1.0, 0.01, "en")

    threads = [threading.Thread(target=claimer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == n
    assert store.counts()["done"] == n


def _process_claimer(db: str, threads: int, start, out) -> None:  # runs in a child process
    store = JobStore(db)
    claimed: list[int] = []
    lock = threading.Lock()
    start.wait()  # a barrier: both processes have their store open before either claims

    def claimer() -> None:
        while (job := store.claim_next()) is not None:
            with lock:
                claimed.append(job.id)
            time.sleep(0.002)  # "work": leaves the write lock free, as real jobs do
            store.mark_done(job.id, 1.0, 0.01, "en", extra={"pid": os.getpid()})

    pool = [threading.Thread(target=claimer) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    store.close()
    out.put((os.getpid(), claimed))


@pytest.mark.timeout(120)
def test_claim_is_exclusive_across_processes(tmp_path: Path) -> None:
    """200 jobs, 2 processes x 2 threads claiming at once: every job claimed exactly once."""
    db = str(tmp_path / "jobs.sqlite3")
    n = 200
    with JobStore(db) as store:
        for i in range(n):
            _enqueue(store, f"/in/{i:03}.wav")
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    out = ctx.Queue()
    procs = [ctx.Process(target=_process_claimer, args=(db, 2, start, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    all_claims = [job_id for _, ids in results for job_id in ids]
    assert len(all_claims) == n and len(set(all_claims)) == n
    assert all(ids for _, ids in results), "both processes should have claimed (they start together)"
    with JobStore(db) as store:
        assert store.counts()["done"] == n
        assert store.counts()["running"] == 0
        pids = {store.get(i).extra["pid"] for i in all_claims}  # type: ignore[union-attr]
    assert pids == {pid for pid, _ in results}


def test_forked_child_gets_its_own_connection(tmp_path: Path) -> None:
    """A store created before a fork keeps working in the child (fresh connection) and parent."""
    store = JobStore(tmp_path / "jobs.sqlite3")
    job = _enqueue(store)
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_claim_and_finish, args=(store,))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    assert store.get(job.id).state == "done"  # type: ignore[union-attr]
    store.close()


def _claim_and_finish(store: JobStore) -> None:
    job = store.claim_next()
    assert job is not None
    store.mark_done(job.id, 1.0, 1.0, "en")


# -- retries, crashes, failures ---------------------------------------------------------------


def test_a_crashed_claim_is_still_running_after_a_reopen(tmp_path: Path) -> None:
    """What start-up recovery (JobRunner.recover_interrupted, tested in test_runner.py) finds."""
    db = tmp_path / "jobs.sqlite3"
    store = JobStore(db)
    job = _enqueue(store)
    store.claim_next(now=T0, worker_pid=111)
    # the daemon dies here: no mark_*; abandon the connection as a crash would
    del store
    store = JobStore(db)
    assert [(j.id, j.worker_pid) for j in store.running()] == [(job.id, 111)]
    back = store.mark_retry(job.id, "interrupted", 0)
    assert (back.state, back.attempts, back.worker_pid) == ("queued", 1, None)
    assert store.claim_next() is not None
    store.close()


def test_clean_requeue_does_not_count(store: JobStore) -> None:
    job = _enqueue(store)
    for _ in range(5):  # e.g. five service restarts while this job ran
        store.claim_next()
        back = store.requeue(job.id)
        assert back.state == "queued"
    assert store.get(job.id).attempts == 0  # type: ignore[union-attr]
    assert store.get(job.id).last_error is None  # type: ignore[union-attr]


def test_retries_wait_for_their_backoff(store: JobStore) -> None:
    """mark_retry holds the job back until its time; the policy that picks the times is tested in test_runner.py."""
    job = _enqueue(store, now=T0)
    max_attempts, now = 3, T0
    while True:
        claimed = store.claim_next(now=now)
        assert claimed is not None and claimed.id == job.id
        if claimed.attempts + 1 >= max_attempts:
            store.mark_failed(job.id, "generate() hung", now=now)
            break
        backoff = 10 * 2**claimed.attempts
        r = store.mark_retry(job.id, "generate() hung", backoff_s=backoff, now=now)
        assert store.claim_next(now=now + backoff - 1) is None
        now = r.not_before
    final = store.get(job.id)
    assert final is not None and (final.state, final.attempts) == ("failed", 3)


def test_counts_and_recent_failures(store: JobStore) -> None:
    assert store.counts() == dict.fromkeys(STATES, 0)
    ids = [_enqueue(store, f"/in/{i}.wav").id for i in range(6)]
    for i, job_id in enumerate(ids[:4]):
        store.claim_next(now=T0 + i)
        if i < 3:
            store.mark_failed(job_id, f"error {i}", now=T0 + 10 + i)
        else:
            store.mark_done(job_id, 1.0, 1.0, "en", now=T0 + 20)
    store.claim_next()
    assert store.counts() == {"queued": 1, "running": 1, "done": 1, "failed": 3, "superseded": 0}
    recent = store.recent_failures(limit=2)
    assert [j.last_error for j in recent] == ["error 2", "error 1"]
    assert all(j.state == "failed" for j in recent)


def test_mark_superseded_for_a_file_that_changed_under_the_worker(store: JobStore) -> None:
    job = _enqueue(store)
    store.claim_next()
    gone = store.mark_superseded(job.id, "file changed since it was queued")
    assert gone.state == "superseded" and gone.is_final
    assert store.counts()["running"] == 0
