"""The embedded backend: one SQLite database (WAL mode) under the state directory.

Why SQLite by default: the queue must survive crashes and restarts, be readable by
``whisperd status`` while the daemon runs, and need nothing else to run. WAL mode lets readers run
while a writer commits; ``BEGIN IMMEDIATE`` makes every state change a short, exclusive write
transaction, so a job is claimed by exactly one claimer across threads and processes of one
machine. WAL needs shared memory, so the file must be on a local disk: hosts that share an inbox
over the network share a PostgreSQL job store instead (whisperd.jobstore.postgres).

Times come from this machine's clock (``time.time()``): here it is the database's clock.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from whisperd.jobstore.base import (
    DEFAULT_LEASE_SECONDS,
    JobStore,
    JobStoreError,
    split_sql,
)
from whisperd.jobstore.hostid import load_host_id

#: Bump together with a new entry in ``_MIGRATIONS``.
SCHEMA_VERSION: Final = 3

#: How long a connection waits for another writer before giving up (SQLite busy_timeout).
DEFAULT_BUSY_TIMEOUT_S: Final = 30.0

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
    # 2: identity relative to an inbox id, leases with owner and fencing token. Rows written before
    # are in the root inbox under their absolute path until the daemon adopts them (_adopt).
    """
    ALTER TABLE jobs ADD COLUMN inbox TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN rel_path BLOB NOT NULL DEFAULT x'';
    ALTER TABLE jobs ADD COLUMN owner TEXT;
    ALTER TABLE jobs ADD COLUMN token INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN lease_expires REAL;
    UPDATE jobs SET rel_path = path;
    CREATE UNIQUE INDEX jobs_identity ON jobs (inbox, rel_path, size, mtime_ns);
    CREATE INDEX jobs_lease ON jobs (lease_expires) WHERE state = 'running';
    """,
    # 3: the completion hooks' outbox, written in the transaction that finishes the job.
    """
    CREATE TABLE hook_deliveries (
        id          TEXT    PRIMARY KEY,         -- the delivery id, the same on every retry
        job_id      INTEGER NOT NULL,
        hook        TEXT    NOT NULL,
        owner       TEXT    NOT NULL,            -- host id of the host that delivers it
        payload     TEXT    NOT NULL,            -- the event, JSON
        state       TEXT    NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
        attempts    INTEGER NOT NULL DEFAULT 0,
        next_at     REAL    NOT NULL DEFAULT 0,
        last_error  TEXT,
        created_at  REAL    NOT NULL,
        finished_at REAL
    );
    CREATE INDEX hook_deliveries_due ON hook_deliveries (owner, next_at) WHERE state = 'pending';
    """,
)
assert len(_MIGRATIONS) == SCHEMA_VERSION


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def one(self, sql: str, params: Mapping[str, Any] | None = None) -> Sequence[Any] | None:
        row: Sequence[Any] | None = self.conn.execute(sql, params or {}).fetchone()
        return row

    def all(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Sequence[Any]]:
        return self.conn.execute(sql, params or {}).fetchall()

    def run(self, sql: str, params: Mapping[str, Any] | None = None) -> int:
        return self.conn.execute(sql, params or {}).rowcount


class SqliteJobStore(JobStore):
    """The job queue in one SQLite file.

    Threads share one connection behind a lock: every operation is a short transaction, so a lock
    costs nothing measurable here and avoids one-connection-per-thread bookkeeping. Processes each
    open their own store on the same file; WAL mode plus ``busy_timeout`` serialises their writes.
    A forked child transparently opens a fresh connection (an SQLite connection must never be used
    on both sides of a fork). Without ``host_id`` the id kept beside the database is used.
    """

    backend = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        host_id: str | None = None,
        inboxes: Mapping[str, str | os.PathLike[str]] | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        super().__init__(host_id=host_id or load_host_id(self.path.parent), inboxes=inboxes,
                         lease_seconds=lease_seconds)
        self._busy_timeout_s = busy_timeout_s
        self._clock = clock
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._connect()
        if inboxes is not None:
            self._adopt()

    @property
    def location(self) -> str:
        return f"sqlite {self.path}"

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
                for statement in split_sql(_MIGRATIONS[step]):
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _adopt(self) -> None:
        """Rows of an inbox id this host no longer has (the v1 rows, an inbox renamed in the config)
        move to the inbox that now holds their path: one machine, so the absolute path decides."""
        known = list(self.inboxes.roots)
        marks = ", ".join("?" * len(known)) or "NULL"
        with self._lock:
            conn = self._connection()
            rows = conn.execute(f"SELECT id, path, inbox FROM jobs WHERE inbox NOT IN ({marks})", known).fetchall()
            moves = [(new[0], new[1], id_) for id_, path, inbox in rows
                     if (new := self.inboxes.locate(os.fsdecode(path)))[0] != inbox]
            if not moves:
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("UPDATE OR IGNORE jobs SET inbox = ?, rel_path = ? WHERE id = ?", moves)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def set_inboxes(self, inboxes: Mapping[str, str | os.PathLike[str]]) -> None:
        super().set_inboxes(inboxes)
        self._adopt()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JobStoreError(f"{self.path}: job store is closed")
        if os.getpid() != self._pid:
            # Forked child: abandon (do not close) the parent's connection, open our own.
            self._conn = None
            return self._connect()
        return self._conn

    @contextmanager
    def _transaction(self) -> Iterator[_SqliteTx]:
        """One exclusive write transaction: taken before reading, so read-then-update is atomic."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteTx(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def _reading(self) -> Iterator[_SqliteTx]:
        with self._lock:
            yield _SqliteTx(self._connection())

    def _now(self, tx: object, now: float | None) -> float:
        return self._clock() if now is None else now

    def _insert_columns(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        return {"path": os.fsencode(os.path.abspath(os.fspath(path)))}

    def _columns(self) -> str:
        return super()._columns() + ", path"

    def _fallback_path(self, row: Sequence[Any], inbox: str, rel: bytes) -> Path:
        return Path(os.fsdecode(row[20]))  # the absolute path it was queued under

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and os.getpid() == self._pid:
                self._conn.close()
            self._conn = None

    def check_writable(self) -> None:
        """Fail now when the file cannot be written (read-only or immutable file or folder, full disk)."""
        with self._transaction() as tx:
            tx.run(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @property
    def schema_version(self) -> int:
        with self._reading() as tx:
            row = tx.one("PRAGMA user_version")
        return int(row[0]) if row else 0
