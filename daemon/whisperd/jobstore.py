"""The persistent job queue: one SQLite database (WAL mode) under the state directory.

Why SQLite: the queue must survive crashes and restarts (no peer tool resumes its queue after a
crash), be readable by ``whisperd status`` while the daemon runs, and need no server. WAL mode lets
readers run while a writer commits; ``BEGIN IMMEDIATE`` makes every state change a short, exclusive
write transaction, so a job is claimed by exactly one claimer across threads and processes.

Identity. A job is keyed by the audio file's identity ``(path, size, mtime_ns)``:

* the same path with a new size or mtime is a *replaced* file and becomes a new job;
* the same identity seen again (a repeated event, a rescan, a restart) is not a new job, whatever
  state its row is in - this is what makes the watcher's "at least once" into "exactly once";
* rows of older identities stay as history.  An older identity still *queued* when a newer one
  arrives is marked ``superseded`` (its content is gone, transcribing it would be wasted work or
  wrong); if that exact identity comes back later (say a backup restored with ``cp -p``), the
  superseded row is revived instead of being ignored, because it never produced a transcript.

Paths are stored as bytes (``os.fsencode``) so that file names that are not valid UTF-8 (Latin-1
names on an SMB share, say) round-trip exactly instead of failing the insert.

Attempts. ``attempts`` counts *unsuccessful* attempts, recorded by ``mark_retry`` and
``mark_failed``: an error, a timeout, or a worker or daemon that died mid-job. A clean hand-back
(SIGTERM while a job runs: ``requeue``) does not count, so restarting the service never burns a
job's retries. Whether a failed attempt is retried, and after how long, is decided above the store
by the one retry policy (whisperd.retry); the store only records state transitions.

Times are wall-clock epoch seconds (``time.time()``) so they mean something to ``whisperd status``
and across processes and reboots; every method that compares with "now" accepts ``now=`` for tests.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

__all__ = [
    "FINAL_STATES",
    "SCHEMA_VERSION",
    "STATES",
    "Job",
    "JobState",
    "JobStateError",
    "JobStore",
    "JobStoreError",
]

class JobState(StrEnum):
    """Where a job is; the values are what the database stores."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"


QUEUED, RUNNING, DONE, FAILED, SUPERSEDED = JobState
STATES: Final[tuple[JobState, ...]] = tuple(JobState)
FINAL_STATES: Final[frozenset[str]] = frozenset({DONE, FAILED, SUPERSEDED})

#: Bump together with a new entry in ``_MIGRATIONS``.
SCHEMA_VERSION: Final = 1

#: How long a connection waits for another writer before giving up (SQLite busy_timeout).
DEFAULT_BUSY_TIMEOUT_S: Final = 30.0

_COLUMNS: Final = (
    "id, path, size, mtime_ns, state, attempts, last_error, enqueued_at, started_at, finished_at, "
    "not_before, audio_seconds, wall_seconds, language, worker_pid, extra_json"
)

# Each entry upgrades the schema from version i to i + 1 (index i). Never edit a released entry:
# add a new one, so that databases written by older versions upgrade in place.
_MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE jobs (
        id            INTEGER PRIMARY KEY,
        path          BLOB    NOT NULL,            -- os.fsencode(absolute path)
        size          INTEGER NOT NULL,
        mtime_ns      INTEGER NOT NULL,
        state         TEXT    NOT NULL
                      CHECK (state IN ('queued', 'running', 'done', 'failed', 'superseded')),
        attempts      INTEGER NOT NULL DEFAULT 0,  -- unsuccessful attempts so far
        last_error    TEXT,
        enqueued_at   REAL    NOT NULL,            -- epoch seconds
        started_at    REAL,
        finished_at   REAL,
        not_before    REAL    NOT NULL DEFAULT 0,  -- retry backoff: not claimed before this time
        audio_seconds REAL,
        wall_seconds  REAL,
        language      TEXT,
        worker_pid    INTEGER,
        extra_json    TEXT    NOT NULL DEFAULT '{}',
        UNIQUE (path, size, mtime_ns)
    );
    CREATE INDEX jobs_queue ON jobs (not_before, id) WHERE state = 'queued';
    CREATE INDEX jobs_state ON jobs (state, finished_at);
    """,
)
assert len(_MIGRATIONS) == SCHEMA_VERSION


def storable(text: str | None) -> str | None:
    """Text for a TEXT column: a file name that is not UTF-8 (surrogate-escaped) is kept as `\\udcXX`
    instead of failing the statement, which would leave the job in its old state."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


class JobStoreError(RuntimeError):
    """The database cannot be used (for instance it was written by a newer whisperd)."""


class JobStateError(ValueError):
    """A state change was asked for a job that is not in a state allowing it.

    Raised instead of silently overwriting, e.g. ``mark_done`` on a job that start-up recovery has
    already put back in the queue: two workers must never both believe they own a job.
    """


@dataclass(frozen=True)
class Job:
    """One row of the queue, as read at one moment (a snapshot: it does not follow the database)."""

    id: int
    path: Path
    size: int
    mtime_ns: int
    state: JobState
    attempts: int
    last_error: str | None
    enqueued_at: float
    started_at: float | None
    finished_at: float | None
    not_before: float
    audio_seconds: float | None
    wall_seconds: float | None
    language: str | None
    worker_pid: int | None
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def identity(self) -> tuple[Path, int, int]:
        """``(path, size, mtime_ns)``: what makes two sightings of a file the same job."""
        return (self.path, self.size, self.mtime_ns)

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    @classmethod
    def _from_row(cls, row: sqlite3.Row | tuple[Any, ...]) -> Job:
        (id_, path, size, mtime_ns, state, attempts, last_error, enqueued_at, started_at,
         finished_at, not_before, audio_seconds, wall_seconds, language, worker_pid, extra_json) = row
        return cls(
            id=id_,
            path=Path(os.fsdecode(path)),
            size=size,
            mtime_ns=mtime_ns,
            state=JobState(state),
            attempts=attempts,
            last_error=last_error,
            enqueued_at=enqueued_at,
            started_at=started_at,
            finished_at=finished_at,
            not_before=not_before,
            audio_seconds=audio_seconds,
            wall_seconds=wall_seconds,
            language=language,
            worker_pid=worker_pid,
            extra=json.loads(extra_json) if extra_json else {},
        )


def _path_key(path: str | os.PathLike[str]) -> bytes:
    """The stored form of a path: absolute (not symlink-resolved, so it matches what the watcher
    reports) and as raw bytes, so any Linux file name round-trips."""
    return os.fsencode(os.path.abspath(os.fspath(path)))


class JobStore:
    """The job queue in one SQLite file; safe to share between threads, one instance per process.

    Threads share one connection behind a lock: every operation is a short transaction, so a lock
    costs nothing measurable here and avoids one-connection-per-thread bookkeeping. Processes each
    open their own ``JobStore`` on the same file; WAL mode plus ``busy_timeout`` serialises their
    writes. If a process forks while holding a store, the child transparently opens a fresh
    connection (an SQLite connection must never be used on both sides of a fork).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._clock = clock
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._connect()

    # -- connection and schema -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout_s,
            isolation_level=None,  # autocommit; transactions are explicit (BEGIN IMMEDIATE)
            check_same_thread=False,  # guarded by self._lock instead
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
        self._set_wal(conn)
        # NORMAL is durable against process crashes in WAL mode; a power cut may lose the last
        # commits, which costs at most a repeated transcription, never a corrupt queue.
        conn.execute("PRAGMA synchronous = NORMAL")
        self._migrate(conn)
        self._conn = conn
        self._pid = os.getpid()
        return conn

    def _set_wal(self, conn: sqlite3.Connection) -> None:
        # Switching to WAL needs a moment of exclusive access; when several processes open a new
        # file at once one of them can see SQLITE_BUSY here even with busy_timeout, so retry.
        deadline = time.monotonic() + self._busy_timeout_s
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        if str(mode).lower() != "wal":
            raise JobStoreError(f"{self.path}: cannot use WAL journal mode (got {mode!r})")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise JobStoreError(
                f"{self.path}: job database schema version {version} is newer than this whisperd "
                f"understands ({SCHEMA_VERSION}); upgrade whisperd or use another state directory"
            )
        if version == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read inside the write lock: another process may have migrated meanwhile.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for step in range(version, SCHEMA_VERSION):
                for statement in _split_sql(_MIGRATIONS[step]):
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JobStoreError(f"{self.path}: job store is closed")
        if os.getpid() != self._pid:
            # Forked child: abandon (do not close) the parent's connection, open our own.
            self._conn = None
            return self._connect()
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One exclusive write transaction: taken before reading, so read-then-update is atomic."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._connection().execute(sql, params).fetchall()

    def close(self) -> None:
        """Close the connection; further calls raise :class:`JobStoreError`."""
        with self._lock:
            if self._conn is not None and os.getpid() == self._pid:
                self._conn.close()
            self._conn = None

    def check_writable(self) -> None:
        """Fail now, not at the first job, when the database cannot be written (read-only or immutable
        file or folder, full disk): a daemon that looks ready but can record nothing helps no one."""
        with self._write() as conn:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return int(self._read("PRAGMA user_version")[0][0])

    # -- producing -------------------------------------------------------------------------------

    def enqueue(
        self,
        path: str | os.PathLike[str],
        size: int,
        mtime_ns: int,
        *,
        extra: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> Job | None:
        """Queue the file with this identity; ``None`` if that identity is already known.

        "Already known" covers every state (queued, running, done, failed), so the watcher may
        report a file as often as it likes. The one exception is a ``superseded`` row: that version
        of the file never finished, so seeing it again revives the row (back to ``queued``).
        Queued rows of *other* identities of the same path become ``superseded``: the file they
        describe has been replaced.
        """
        key = _path_key(path)
        now = self._clock() if now is None else now
        with self._write() as conn:
            row = conn.execute(
                "SELECT id, state FROM jobs WHERE path = ? AND size = ? AND mtime_ns = ?",
                (key, size, mtime_ns),
            ).fetchone()
            if row is not None and row[1] != SUPERSEDED:
                return None
            if row is None:
                job_id = conn.execute(
                    "INSERT INTO jobs (path, size, mtime_ns, state, enqueued_at, not_before, extra_json)"
                    " VALUES (?, ?, ?, 'queued', ?, 0, ?)",
                    (key, size, mtime_ns, now, json.dumps(dict(extra or {}))),
                ).lastrowid
            else:
                job_id = row[0]
                conn.execute(
                    "UPDATE jobs SET state = 'queued', enqueued_at = ?, finished_at = NULL,"
                    " not_before = 0, last_error = NULL WHERE id = ?",
                    (now, job_id),
                )
            conn.execute(
                "UPDATE jobs SET state = 'superseded', finished_at = ?,"
                " last_error = 'superseded by job ' || ? WHERE path = ? AND state = 'queued' AND id != ?",
                (now, job_id, key, job_id),
            )
            return self._get(conn, job_id)

    # -- consuming -------------------------------------------------------------------------------

    def claim_next(self, now: float | None = None, *, worker_pid: int | None = None) -> Job | None:
        """Atomically move the oldest claimable queued job to ``running`` and return it.

        Claimable means ``not_before <= now`` (retry backoff). Oldest is by enqueue order, so a
        retried job keeps its place once its backoff is over. ``None`` when nothing is claimable.
        Exclusive across threads and processes: the select and the update share one
        ``BEGIN IMMEDIATE`` transaction.
        """
        now = self._clock() if now is None else now
        pid = os.getpid() if worker_pid is None else worker_pid
        with self._write() as conn:
            row = conn.execute(
                "SELECT id FROM jobs WHERE state = 'queued' AND not_before <= ? ORDER BY id LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET state = 'running', started_at = ?, finished_at = NULL,"
                " worker_pid = ? WHERE id = ?",
                (now, pid, row[0]),
            )
            return self._get(conn, row[0])

    def next_claimable_at(self) -> float | None:
        """Earliest ``not_before`` among queued jobs (0 if one is claimable at any time), or
        ``None`` when the queue is empty - lets a worker sleep exactly until a backoff ends."""
        value = self._read("SELECT MIN(not_before) FROM jobs WHERE state = 'queued'")[0][0]
        return None if value is None else float(value)

    def mark_done(
        self,
        job_id: int,
        audio_seconds: float | None,
        wall_seconds: float | None,
        language: str | None,
        *,
        extra: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> Job:
        """``running`` → ``done``, recording what the run measured (for status and speed stats).

        ``extra`` is merged into the job's JSON side data (e.g. the outputs written, the rules used).
        """
        now = self._clock() if now is None else now
        with self._write() as conn:
            job = self._require(conn, job_id, (RUNNING,))
            merged = {**job.extra, **(extra or {})}
            conn.execute(
                "UPDATE jobs SET state = 'done', finished_at = ?, audio_seconds = ?, wall_seconds = ?,"
                " language = ?, extra_json = ?, not_before = 0 WHERE id = ?",
                (now, audio_seconds, wall_seconds, language, json.dumps(merged), job_id),
            )
            return self._get(conn, job_id)

    def mark_retry(self, job_id: int, error: str, backoff_s: float, *, now: float | None = None) -> Job:
        """``running`` → ``queued`` after an error: one more attempt counted, not claimable for
        ``backoff_s`` seconds. Whether to retry or give up is the caller's policy."""
        now = self._clock() if now is None else now
        with self._write() as conn:
            self._require(conn, job_id, (RUNNING,))
            conn.execute(
                "UPDATE jobs SET state = 'queued', attempts = attempts + 1, last_error = ?,"
                " not_before = ?, started_at = NULL, worker_pid = NULL WHERE id = ?",
                (storable(error), now + max(0.0, backoff_s), job_id),
            )
            return self._get(conn, job_id)

    def mark_failed(self, job_id: int, error: str, *, now: float | None = None) -> Job:
        """→ ``failed`` for good (the failing attempt is counted). Allowed from ``queued`` too, so a
        job can be failed without running it (e.g. its folder's rule file is broken)."""
        now = self._clock() if now is None else now
        with self._write() as conn:
            self._require(conn, job_id, (RUNNING, QUEUED))
            conn.execute(
                "UPDATE jobs SET state = 'failed', attempts = attempts + 1, last_error = ?,"
                " finished_at = ? WHERE id = ?",
                (storable(error), now, job_id),
            )
            return self._get(conn, job_id)

    def mark_superseded(self, job_id: int, reason: str, *, now: float | None = None) -> Job:
        """→ ``superseded``: the file changed under a claimed or queued job (the worker re-stats
        before decoding); the newer identity is, or will be, its own job."""
        now = self._clock() if now is None else now
        with self._write() as conn:
            self._require(conn, job_id, (RUNNING, QUEUED))
            conn.execute(
                "UPDATE jobs SET state = 'superseded', last_error = ?, finished_at = ? WHERE id = ?",
                (storable(reason), now, job_id),
            )
            return self._get(conn, job_id)

    def requeue(self, job_id: int, *, error: str | None = None, now: float | None = None) -> Job:
        """``running`` → ``queued``, claimable at once, no attempt counted: the clean hand-back
        (SIGTERM during a job) - nothing went wrong with the job, so its retries are untouched.
        A failed attempt goes through ``mark_retry`` or ``mark_failed`` instead."""
        with self._write() as conn:
            self._require(conn, job_id, (RUNNING,))
            conn.execute(
                "UPDATE jobs SET state = 'queued', not_before = 0, started_at = NULL, worker_pid = NULL,"
                " last_error = COALESCE(?, last_error) WHERE id = ?",
                (storable(error), job_id),
            )
            return self._get(conn, job_id)

    # -- reading ---------------------------------------------------------------------------------

    def get(self, job_id: int) -> Job | None:
        """The job with this id, or ``None``."""
        with self._lock:
            return self._get(self._connection(), job_id)

    def counts(self) -> dict[str, int]:
        """Number of jobs per state, every state present (zeros included) - for status and STATUS=."""
        result = dict.fromkeys(STATES, 0)
        for state, n in self._read("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            result[state] = n
        return result

    def running(self) -> list[Job]:
        """Jobs currently claimed, oldest claim first."""
        return self._jobs("WHERE state = 'running' ORDER BY started_at, id")

    def queued(self, limit: int | None = None) -> list[Job]:
        """Queued jobs in claim order (backoff ignored)."""
        return self._jobs("WHERE state = 'queued' ORDER BY id" + _limit(limit))

    def recent_failures(self, limit: int = 20) -> list[Job]:
        """Jobs that ended ``failed``, most recent first - what an operator looks at first."""
        return self._jobs("WHERE state = 'failed' ORDER BY finished_at DESC, id DESC" + _limit(limit))

    def latest_for_path(self, path: str | os.PathLike[str]) -> Job | None:
        """The most recently created row for this path (any identity, any state)."""
        jobs = self._jobs("WHERE path = ? ORDER BY id DESC LIMIT 1", (_path_key(path),))
        return jobs[0] if jobs else None

    def history_for_path(self, path: str | os.PathLike[str]) -> list[Job]:
        """Every row for this path, oldest first (older identities included)."""
        return self._jobs("WHERE path = ? ORDER BY id", (_path_key(path),))

    def _jobs(self, where: str, params: tuple[Any, ...] = ()) -> list[Job]:
        return [Job._from_row(r) for r in self._read(f"SELECT {_COLUMNS} FROM jobs {where}", params)]

    @staticmethod
    def _get(conn: sqlite3.Connection, job_id: int) -> Job | None:
        row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else Job._from_row(row)

    @classmethod
    def _require(cls, conn: sqlite3.Connection, job_id: int, states: tuple[str, ...]) -> Job:
        job = cls._get(conn, job_id)
        if job is None:
            raise JobStateError(f"job {job_id} does not exist")
        if job.state not in states:
            raise JobStateError(f"job {job_id} is {job.state}, expected {' or '.join(states)}")
        return job


def _limit(limit: int | None) -> str:
    return "" if limit is None else f" LIMIT {int(limit)}"


def _split_sql(script: str) -> list[str]:
    """Statements of a migration script, run one by one inside our own transaction
    (``executescript`` would commit the open transaction first)."""
    return [s.strip() for s in script.split(";") if s.strip()]
