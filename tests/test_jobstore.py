"""The job store contract - identity, claiming, leases, retries, crash recovery, persistence - run
against both backends (SQLite and a real PostgreSQL server), plus what is particular to each."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pg_harness import PostgresServer
from whisperd.jobstore import (
    SCHEMA_VERSION,
    STATES,
    Job,
    JobStateError,
    JobStore,
    JobStoreError,
    JobStoreUnavailable,
    SqliteJobStore,
)
from whisperd.jobstore.postgres import SCHEMA_VERSION as PG_SCHEMA_VERSION
from whisperd.jobstore.postgres import PostgresJobStore

pytestmark = pytest.mark.timeout(60)

T0 = 1_700_000_000.0
BACKENDS = ["sqlite", "postgresql"]

#: (backend, where): enough to open the same database again, in this process or a spawned one.
Spec = tuple[str, str]


def open_spec(spec: Spec, **kw: Any) -> JobStore:
    backend, where = spec
    if backend == "sqlite":
        return SqliteJobStore(where, **kw)
    return PostgresJobStore(where, **{"host_id": "host-a", **kw})


@pytest.fixture(params=BACKENDS)
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> Spec:
    if request.param == "sqlite":
        (tmp_path / "state").mkdir()
        return ("sqlite", str(tmp_path / "state" / "jobs.sqlite3"))
    return ("postgresql", request.getfixturevalue("pg_url"))


@pytest.fixture
def opener(spec: Spec) -> Iterator[Callable[..., JobStore]]:
    """Opens stores on the test's database (another host: `opener(host_id=..., inboxes=...)`)."""
    opened: list[JobStore] = []

    def open_(**kw: Any) -> JobStore:
        opened.append(open_spec(spec, **kw))
        return opened[-1]

    yield open_
    for s in opened:
        s.close()


@pytest.fixture
def store(opener: Callable[..., JobStore]) -> JobStore:
    return opener()


def _enqueue(store: JobStore, path: str = "/in/talk.wav", size: int = 100, mtime_ns: int = 1, **kw) -> Job:
    job = store.enqueue(path, size, mtime_ns, **kw)
    assert job is not None
    return job


# -- schema and persistence -------------------------------------------------------------------


def test_sqlite_creates_wal_database_with_schema_version(tmp_path: Path) -> None:
    db = tmp_path / "state" / "jobs.sqlite3"
    with SqliteJobStore(db) as store:
        assert store.schema_version == SCHEMA_VERSION
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    raw.close()


def test_refuses_database_from_newer_version(spec: Spec) -> None:
    if spec[0] == "sqlite":
        raw = sqlite3.connect(spec[1])
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        raw.close()
        with pytest.raises(JobStoreError, match="newer"):
            open_spec(spec)
        return
    with open_spec(spec) as store:
        assert store.schema_version == PG_SCHEMA_VERSION
    with psycopg.connect(spec[1], autocommit=True) as raw:
        raw.execute("UPDATE whisperd_schema SET version = 99")
    with open_spec(spec) as store, pytest.raises(JobStoreError, match="newer"):
        store.counts()


def test_state_persists_across_reopen(opener: Callable[..., JobStore]) -> None:
    with opener() as store:
        a = _enqueue(store, "/in/a.wav")
        b = _enqueue(store, "/in/b.wav")
        _enqueue(store, "/in/c.wav")
        claimed = store.claim_next()
        assert claimed is not None and claimed.id == a.id
        store.mark_done(a.id, audio_seconds=60.0, wall_seconds=6.0, language="en", extra={"outputs": ["txt"]})
        store.mark_failed(b.id, "decode error")
    with opener() as store:
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


def _process_claimer(spec: Spec, threads: int, start, out) -> None:  # runs in a child process
    store = open_spec(spec, host_id=f"host-{os.getpid()}")
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
def test_claim_is_exclusive_across_processes(spec: Spec) -> None:
    """200 jobs, 2 processes x 2 threads claiming at once: every job claimed exactly once."""
    n = 200
    with open_spec(spec) as store:
        for i in range(n):
            _enqueue(store, f"/in/{i:03}.wav")
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    out = ctx.Queue()
    procs = [ctx.Process(target=_process_claimer, args=(spec, 2, start, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    all_claims = [job_id for _, ids in results for job_id in ids]
    assert len(all_claims) == n and len(set(all_claims)) == n
    assert all(ids for _, ids in results), "both processes should have claimed (they start together)"
    with open_spec(spec) as store:
        assert store.counts()["done"] == n
        assert store.counts()["running"] == 0
        pids = {store.get(i).extra["pid"] for i in all_claims}  # type: ignore[union-attr]
        owners = {store.get(i).owner for i in all_claims}  # type: ignore[union-attr]
    assert pids == {pid for pid, _ in results}
    assert owners == {f"host-{pid}" for pid, _ in results}


def test_sqlite_forked_child_gets_its_own_connection(tmp_path: Path) -> None:
    """A store created before a fork keeps working in the child (fresh connection) and parent."""
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
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


def test_a_crashed_claim_is_still_running_after_a_reopen(opener: Callable[..., JobStore]) -> None:
    """What start-up recovery (JobRunner.recover_interrupted, tested in test_runner.py) finds."""
    store = opener(host_id="host-a")
    job = _enqueue(store)
    store.claim_next(now=T0, worker_pid=111)
    # the daemon dies here: no mark_*; abandon the connection as a crash would
    store = opener(host_id="host-a")
    assert [(j.id, j.worker_pid, j.owner) for j in store.running()] == [(job.id, 111, "host-a")]
    assert [j.id for j in store.running(owner="host-a")] == [job.id]
    assert store.running(owner="host-b") == []
    back = store.mark_retry(job.id, "interrupted", 0)
    assert (back.state, back.attempts, back.worker_pid) == ("queued", 1, None)
    assert store.claim_next() is not None


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


# -- several hosts: identities, leases, fencing --------------------------------------------------


def test_identity_is_relative_to_the_inbox_id_so_hosts_mounting_the_share_elsewhere_agree(
        opener: Callable[..., JobStore], spec: Spec) -> None:
    a = opener(host_id="host-a", inboxes={"meetings": "/mnt/share/meetings"})
    b = opener(host_id="host-b", inboxes={"meetings": "/srv/meetings", "nested": "/srv/meetings/deep"})
    job = a.enqueue("/mnt/share/meetings/2024/talk.wav", 100, 1)
    assert job is not None and (job.inbox, job.rel_path) == ("meetings", b"2024/talk.wav")
    assert job.path == Path("/mnt/share/meetings/2024/talk.wav")
    assert b.enqueue("/srv/meetings/2024/talk.wav", 100, 1) is None  # the same file, seen from host b
    claimed = b.claim_next()
    assert claimed is not None and claimed.id == job.id
    assert claimed.path == Path("/srv/meetings/2024/talk.wav")  # mapped to b's own mount
    assert b.latest_for_path("/srv/meetings/2024/talk.wav").id == job.id  # type: ignore[union-attr]
    inner = b.enqueue("/srv/meetings/deep/x.wav", 1, 1)  # the innermost inbox wins
    assert inner is not None and (inner.inbox, inner.rel_path) == ("nested", b"x.wav")
    # An inbox host a lacks: SQLite (one machine) shows the path it was queued under.
    unmapped = Path("nested:/x.wav") if spec[0] == "postgresql" else Path("/srv/meetings/deep/x.wav")
    assert a.get(inner.id).path == unmapped  # type: ignore[union-attr]
    outside = a.enqueue("/elsewhere/y.wav", 1, 1)
    assert outside is not None and (outside.inbox, outside.rel_path) == ("", b"/elsewhere/y.wav")


def test_claims_carry_owner_token_and_lease(opener: Callable[..., JobStore]) -> None:
    a = opener(host_id="host-a", lease_seconds=30)
    job = _enqueue(a)
    assert (job.owner, job.token, job.lease_expires) == (None, 0, None)
    first = a.claim_next(now=T0)
    assert first is not None and (first.owner, first.token, first.lease_expires) == ("host-a", 1, T0 + 30)
    assert a.renew(job.id, first.token, now=T0 + 10) == T0 + 40
    assert a.get(job.id).lease_expires == T0 + 40  # type: ignore[union-attr]
    a.requeue(job.id, token=first.token)
    second = a.claim_next(now=T0 + 50)
    assert second is not None and second.token == 2  # +1 per claim
    with pytest.raises(JobStateError, match="claim 1 is lost"):
        a.renew(job.id, first.token, now=T0 + 51)


def test_an_expired_lease_is_taken_back_by_another_host_and_the_late_owner_is_refused(
        opener: Callable[..., JobStore]) -> None:
    a, b = opener(host_id="host-a", lease_seconds=30), opener(host_id="host-b", lease_seconds=30)
    job = _enqueue(a)
    claim = a.claim_next(now=T0)
    assert claim is not None
    assert b.expired(now=T0 + 29) == []
    with pytest.raises(JobStateError, match="has not expired"):  # host a is still within its lease
        b.mark_retry(job.id, "lease expired", 0, now=T0 + 29, token=claim.token, expired=True)
    [late] = b.expired(now=T0 + 31)
    assert (late.id, late.owner, late.token) == (job.id, "host-a", 1)
    back = b.mark_retry(job.id, "host-a stopped renewing", 0, now=T0 + 31, token=late.token, expired=True)
    assert (back.state, back.attempts) == ("queued", 1)  # counted: the file may be what killed host a
    with pytest.raises(JobStateError):  # a second host taking it back too is refused
        a.mark_retry(job.id, "host-a stopped renewing", 0, now=T0 + 31, token=late.token, expired=True)
    again = b.claim_next(now=T0 + 32)
    assert again is not None and (again.owner, again.token) == ("host-b", 2)
    with pytest.raises(JobStateError, match="claim 1 is lost"):  # host a comes back: fenced off
        a.mark_done(job.id, 1.0, 1.0, "en", token=claim.token)
    with pytest.raises(JobStateError):
        a.renew(job.id, claim.token)
    done = b.mark_done(job.id, 1.0, 1.0, "en", token=again.token)
    assert (done.state, done.owner) == ("done", "host-b")
    # A repeated mark_done of the same claim (its reply was lost with the connection) is fine;
    # of another claim it is not.
    assert b.mark_done(job.id, 1.0, 1.0, "en", token=again.token).state == "done"
    with pytest.raises(JobStateError):
        a.mark_done(job.id, 1.0, 1.0, "en", token=claim.token)


def test_a_renewed_lease_is_not_expired(opener: Callable[..., JobStore]) -> None:
    a, b = opener(host_id="host-a", lease_seconds=10), opener(host_id="host-b", lease_seconds=10)
    job = _enqueue(a)
    claim = a.claim_next(now=T0)
    for t in range(5, 60, 5):  # the heartbeat
        a.renew(job.id, claim.token, now=T0 + t)  # type: ignore[union-attr]
        assert b.expired(now=T0 + t + 9) == []
    assert [j.id for j in b.expired(now=T0 + 66)] == [job.id]
    # Renewing after expiry still works while nobody has taken the job back.
    assert a.renew(job.id, claim.token, now=T0 + 70) == T0 + 80  # type: ignore[union-attr]
    assert b.expired(now=T0 + 75) == []


def test_racing_watchers_leave_one_queued_row_per_file(opener: Callable[..., JobStore]) -> None:
    """Two hosts' watchers see two versions of each file at the same moment (a copy finishing
    while a rescan runs): whatever the interleaving, one row per identity and one queued per path."""
    hosts = [opener(host_id=f"host-{n}", inboxes={"in": f"/mnt/{n}/in"}) for n in range(4)]
    files = 25
    start = threading.Barrier(len(hosts))

    def watcher(n: int, store: JobStore) -> None:
        start.wait()
        for i in range(files):
            for version in ((1, 1), (2, 2)) if n % 2 else ((2, 2), (1, 1)):
                store.enqueue(f"/mnt/{n}/in/f{i}.wav", *version)

    threads = [threading.Thread(target=watcher, args=(n, s)) for n, s in enumerate(hosts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader = hosts[0]
    assert len(reader.queued()) == files
    for i in range(files):
        history = reader.history_for_path(f"/mnt/0/in/f{i}.wav")
        assert len(history) == 2 and len({j.identity for j in history}) == 2
        assert sorted(j.state for j in history) == ["queued", "superseded"]
    assert reader.counts() == {"queued": files, "running": 0, "done": 0, "failed": 0, "superseded": files}


def test_recent_done_most_recent_first(store: JobStore) -> None:
    ids = [_enqueue(store, f"/in/{i}.wav").id for i in range(3)]
    for i, job_id in enumerate(ids):
        claim = store.claim_next(now=T0 + i)
        store.mark_done(job_id, 1.0, 1.0, "en", now=T0 + 10 - i, token=claim.token)  # type: ignore[union-attr]
    assert [j.id for j in store.recent_done(2)] == [ids[0], ids[1]]


# -- PostgreSQL: notifications, outages, the database's clock ---------------------------------


def test_postgres_notifies_idle_hosts_when_a_job_is_queued(pg_url: str) -> None:
    woken = threading.Event()
    with PostgresJobStore(pg_url, host_id="idle") as idle, PostgresJobStore(pg_url, host_id="busy") as busy:
        idle.on_queued(woken.set)
        assert woken.wait(10), "the listener calls back once it listens (for what it may have missed)"
        woken.clear()
        time.sleep(0.2)
        started = time.monotonic()
        busy.enqueue("/in/new.wav", 1, 1)
        assert woken.wait(5)
        print(f"notification after {1000 * (time.monotonic() - started):.1f} ms")


def test_postgres_leases_use_the_database_clock(pg_url: str) -> None:
    with PostgresJobStore(pg_url, host_id="a", lease_seconds=60) as store:
        store.enqueue("/in/a.wav", 1, 1)
        with psycopg.connect(pg_url) as raw:
            db_now = float(raw.execute("SELECT EXTRACT(EPOCH FROM now())").fetchone()[0])  # type: ignore[index]
        claim = store.claim_next()
        assert claim is not None and claim.lease_expires is not None
        assert abs(claim.lease_expires - (db_now + 60)) < 5


def test_postgres_outage_raises_unavailable_then_recovers(own_postgres_server: PostgresServer) -> None:
    server = own_postgres_server
    url = server.new_database()
    with PostgresJobStore(url, host_id="a") as store:
        job = store.enqueue("/in/a.wav", 1, 1)
        claim = store.claim_next()
        assert job is not None and claim is not None
        server.stop("fast")
        with pytest.raises(JobStoreUnavailable):
            store.mark_done(job.id, 1.0, 1.0, "en", token=claim.token)
        with pytest.raises(JobStoreUnavailable):  # fails fast while reconnecting is paused
            store.counts()
        server.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                done = store.mark_done(job.id, 1.0, 1.0, "en", token=claim.token)
                break
            except JobStoreUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert done.state == "done" and store.counts()["done"] == 1


def test_postgres_unreachable_at_open_is_unavailable_not_fatal(tmp_path: Path) -> None:
    store = PostgresJobStore(f"postgresql://whisperd@/x?host={tmp_path}", host_id="a")  # nothing listens
    with pytest.raises(JobStoreUnavailable):
        store.claim_next()
    store.close()


# -- SQLite: upgrading a version 1 database ---------------------------------------------------


def test_sqlite_version_1_database_is_upgraded_and_its_rows_adopted_by_their_inbox(tmp_path: Path) -> None:
    from whisperd.jobstore.sqlite import _MIGRATIONS

    db = tmp_path / "jobs.sqlite3"
    raw = sqlite3.connect(db)
    raw.executescript(_MIGRATIONS[0] + "PRAGMA user_version = 1;")
    raw.execute("INSERT INTO jobs (path, size, mtime_ns, state, enqueued_at) VALUES (?, 100, 1, 'done', 1)",
                (b"/srv/inbox/talk.wav",))
    raw.execute("INSERT INTO jobs (path, size, mtime_ns, state, enqueued_at, started_at, worker_pid)"
                " VALUES (?, 5, 1, 'running', 1, 2, 77)", (b"/srv/inbox/sub/crashed.wav",))
    raw.commit()
    raw.close()
    with SqliteJobStore(db, host_id="me", inboxes={"/srv/inbox": "/srv/inbox"}) as store:
        assert store.schema_version == SCHEMA_VERSION == 3
        done, running = store.get(1), store.get(2)
        assert done is not None and (done.inbox, done.rel_path, done.path) == (
            "/srv/inbox", b"talk.wav", Path("/srv/inbox/talk.wav"))
        assert running is not None and (running.rel_path, running.owner, running.token) == (b"sub/crashed.wav", None, 0)
        assert store.enqueue("/srv/inbox/talk.wav", 100, 1) is None  # still known: not transcribed again
        assert [j.id for j in store.running(owner="me")] == [2]  # claimed before owners were recorded
    with SqliteJobStore(db, host_id="me", inboxes={"meetings": "/srv/inbox"}) as store:  # the inbox got an id
        assert store.get(2).inbox == "meetings"  # type: ignore[union-attr]
        assert store.enqueue("/srv/inbox/talk.wav", 100, 1) is None
    with SqliteJobStore(db) as store:  # `whisperd status --state-dir`: no inboxes, the stored path is shown
        assert store.get(1).path == Path("/srv/inbox/talk.wav")  # type: ignore[union-attr]


# -- throughput -------------------------------------------------------------------------------


def test_throughput(opener: Callable[..., JobStore], spec: Spec) -> None:
    """Enqueue and claim-to-done rates, one thread; printed for the README (-s shows them)."""
    store = opener(host_id="bench", inboxes={"in": "/in"})
    n = 500
    started = time.perf_counter()
    for i in range(n):
        store.enqueue(f"/in/{i:05}.wav", 1000, 1)
    enqueue_rate = n / (time.perf_counter() - started)
    started = time.perf_counter()
    while (job := store.claim_next()) is not None:
        store.mark_done(job.id, 1.0, 1.0, "en", token=job.token)
    claim_rate = n / (time.perf_counter() - started)
    assert store.counts()["done"] == n
    print(f"{spec[0]}: enqueue {enqueue_rate:.0f}/s, claim + mark_done {claim_rate:.0f}/s")


def test_retry_failed_requeues_the_latest_failed_job_of_each_path(store: JobStore) -> None:
    old = _enqueue(store, "/in/a.wav", mtime_ns=1)
    store.mark_failed(old.id, "bad rule file")
    newer = _enqueue(store, "/in/a.wav", mtime_ns=2)  # the file was replaced: `old` is history now
    store.mark_failed(newer.id, "bad rule file")
    other = _enqueue(store, "/in/b.wav")
    store.mark_failed(other.id, "bad rule file")
    done = _enqueue(store, "/in/c.wav")
    assert store.claim_next() is not None
    store.mark_done(done.id, 1.0, 1.0, "en")

    assert store.retry_failed(["/in/c.wav", "/in/nothing.wav"]) == []  # not failed, unknown
    [again] = store.retry_failed(["/in/a.wav", "/in/a.wav"])
    assert (again.id, again.state, again.attempts, again.finished_at) == (newer.id, "queued", 0, None)
    assert again.last_error == "bad rule file"  # kept until the job finishes
    assert [j.id for j in store.retry_failed()] == [other.id]  # never the replaced version
    assert store.get(old.id).state == "failed"  # type: ignore[union-attr]
    claimed = store.claim_next()
    assert claimed is not None and claimed.id == newer.id


def test_retry_failed_through_another_store_is_claimed_by_the_daemon(opener: Callable[..., JobStore]) -> None:
    daemon, cli = opener(), opener()
    job = _enqueue(daemon, "/in/a.wav")
    daemon.mark_failed(job.id, "broken")
    assert daemon.claim_next() is None
    assert [j.id for j in cli.retry_failed()] == [job.id]
    assert daemon.next_claimable_at() == 0
    claimed = daemon.claim_next()
    assert claimed is not None and claimed.id == job.id and claimed.attempts == 0


def test_hook_events_are_recorded_with_the_final_state_and_delivered_by_their_host(
        opener: Callable[..., JobStore]) -> None:
    store, other_host = opener(), opener(host_id="host-b")
    done = _enqueue(store, "/in/a.wav")
    assert store.claim_next(now=T0) is not None
    store.mark_done(done.id, 1.0, 1.0, "en", now=T0 + 1,
                    hooks=[("index", {"event": "job.done", "path": "/in/a\udcff"})])
    failed = _enqueue(store, "/in/b.wav")
    store.mark_failed(failed.id, "broken", now=T0 + 2, hooks=[("notify", {"event": "job.failed"})])
    late = _enqueue(store, "/in/c.wav")
    with pytest.raises(JobStateError):  # refused: nothing of it may be recorded
        store.mark_done(late.id, 1.0, 1.0, "en", hooks=[("index", {"event": "job.done"})])

    assert other_host.due_deliveries(now=T0 + 10) == []  # an exec hook runs where the job ran
    first, second = store.due_deliveries(now=T0 + 10)
    assert (first.hook, first.job_id, first.payload["path"]) == ("index", done.id, "/in/a\udcff")
    assert first.payload["delivery_id"] == first.id and first.id != second.id
    store.delivery_attempted(first.id, now=T0 + 10)
    store.delivery_attempted(second.id, error="HTTP 503", retry_in=5.0, now=T0 + 10)
    assert store.due_deliveries(now=T0 + 11) == [] and store.next_delivery_at() == T0 + 15
    [again] = store.due_deliveries(now=T0 + 16)
    assert (again.id, again.attempts, again.last_error) == (second.id, 1, "HTTP 503")
    store.delivery_attempted(second.id, error="HTTP 404", now=T0 + 16)
    assert store.next_delivery_at() is None
    [given_up] = other_host.failed_deliveries()
    assert (given_up.id, given_up.state, given_up.attempts, given_up.last_error) == (second.id, "failed", 2, "HTTP 404")
