"""The shared backend: one PostgreSQL database that every host of an inbox share claims from.

SQLite's WAL mode needs shared memory and so a local disk; hosts that share recordings over
NFS or SMB share this store instead. The SQL is the one queue libraries use:

* claiming selects the oldest claimable row ``FOR UPDATE SKIP LOCKED``: concurrent claimers on
  any number of hosts never wait for each other and never get the same row;
* enqueueing takes a transaction-level advisory lock on a hash of ``(inbox, path)`` before it looks
  the identity up, and inserts ``ON CONFLICT DO NOTHING``: two watchers racing two versions of one
  file leave one queued row, the older one superseded;
* transitions lock their row (``FOR UPDATE``) and check the state and the fencing token;
* ``NOTIFY whisperd_jobs`` on commit wakes idle hosts (``LISTEN`` on a connection of its own);
  polling remains the fallback.

Leases and timestamps use the database's clock (``now()``): the one clock all hosts share.

A lost connection (server restart, network) raises :class:`JobStoreUnavailable`; the next call
connects again. After a failed connect, calls fail fast for ``RECONNECT_PAUSE_S`` so that the
watcher's and the main loop's threads do not each wait out a connect timeout.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Final

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

from whisperd.jobstore.base import DEFAULT_LEASE_SECONDS, JobStore, JobStoreError, JobStoreUnavailable, split_sql
from whisperd.logs import get_logger

log = get_logger("whisperd.jobstore")

SCHEMA_VERSION: Final = 2
CHANNEL: Final = "whisperd_jobs"
CONNECT_TIMEOUT_S: Final = 5
#: libpq settings the URL may override: a connection to a host that vanished without a reset
#: (a network partition) fails within about 30 s instead of hanging a call for TCP's 15 minutes.
CONNECTION_DEFAULTS: Final = {"connect_timeout": CONNECT_TIMEOUT_S, "keepalives_idle": 20, "keepalives_interval": 5,
                              "keepalives_count": 3, "tcp_user_timeout": 30_000}
RECONNECT_PAUSE_S: Final = 1.0
LISTEN_BACKOFF_MAX_S: Final = 10.0
#: pg_advisory_xact_lock key that serialises schema migrations across hosts.
_MIGRATION_LOCK: Final = 0x77686973706572  # "whisper"

# Each entry upgrades the schema from version i to i + 1. Never edit a released entry: add one.
_MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE jobs (
        id            bigserial PRIMARY KEY,
        inbox         text             NOT NULL,   -- the inbox id, the same on every host
        rel_path      bytea            NOT NULL,   -- path inside the inbox, as raw bytes
        size          bigint           NOT NULL,
        mtime_ns      bigint           NOT NULL,
        state         text             NOT NULL
                      CHECK (state IN ('queued', 'running', 'done', 'failed', 'superseded')),
        attempts      integer          NOT NULL DEFAULT 0,
        last_error    text,
        enqueued_at   double precision NOT NULL,   -- epoch seconds, database clock
        started_at    double precision,
        finished_at   double precision,
        not_before    double precision NOT NULL DEFAULT 0,
        audio_seconds double precision,
        wall_seconds  double precision,
        language      text,
        worker_pid    integer,
        owner         text,                        -- host id of the last claimer
        token         bigint           NOT NULL DEFAULT 0,  -- +1 per claim: the fencing token
        lease_expires double precision,
        extra         jsonb            NOT NULL DEFAULT '{}',
        UNIQUE (inbox, rel_path, size, mtime_ns)
    );
    CREATE INDEX jobs_queue ON jobs (id) WHERE state = 'queued';
    CREATE INDEX jobs_lease ON jobs (lease_expires) WHERE state = 'running';
    CREATE INDEX jobs_state ON jobs (state, finished_at);
    """,
    # 2: the completion hooks' outbox, written in the transaction that finishes the job.
    """
    CREATE TABLE hook_deliveries (
        id          text             PRIMARY KEY,  -- the delivery id, the same on every retry
        job_id      bigint           NOT NULL,
        hook        text             NOT NULL,
        owner       text             NOT NULL,     -- host id of the host that delivers it
        payload     text             NOT NULL,     -- the event, JSON (text: names may not be UTF-8)
        state       text             NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'failed')),
        attempts    integer          NOT NULL DEFAULT 0,
        next_at     double precision NOT NULL DEFAULT 0,
        last_error  text,
        created_at  double precision NOT NULL,
        finished_at double precision
    );
    CREATE INDEX hook_deliveries_due ON hook_deliveries (owner, next_at) WHERE state = 'pending';
    """,
)
assert len(_MIGRATIONS) == SCHEMA_VERSION


@lru_cache(maxsize=256)
def _pyformat(sql: str) -> str:
    """``:name`` parameters (the shared SQL's style) as psycopg's ``%(name)s``; ``::`` casts stay."""
    return re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", sql.replace("%", "%%"))


class _PgTx:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def one(self, sql: str, params: Mapping[str, Any] | None = None) -> Sequence[Any] | None:
        return self.conn.execute(_pyformat(sql), params or {}).fetchone()

    def all(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Sequence[Any]]:
        return self.conn.execute(_pyformat(sql), params or {}).fetchall()

    def run(self, sql: str, params: Mapping[str, Any] | None = None) -> int:
        return self.conn.execute(_pyformat(sql), params or {}).rowcount


def identity_lock_key(inbox: str, rel: bytes) -> int:
    """A signed 64-bit key for pg_advisory_xact_lock from one path's identity."""
    digest = hashlib.blake2b(inbox.encode("utf-8", "surrogateescape") + b"\0" + rel, digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def safe_url(url: str) -> str:
    """The URL without its password, for logs and status."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return "(unparsable URL)"
    params.pop("password", None)
    host, db, user = (str(params.get(key, "")) for key in ("host", "dbname", "user"))
    return f"postgresql {user + '@' if user else ''}{host or 'localhost'}/{db}"


def validate_url(url: str) -> str | None:
    """A problem with the URL's syntax, or None (nothing is connected to)."""
    try:
        conninfo_to_dict(url)
    except psycopg.Error as exc:
        return str(exc).strip()
    return None


class PostgresJobStore(JobStore):
    """The job queue in a PostgreSQL database shared by several hosts.

    One connection per process, used by one thread at a time behind a lock (operations are short
    transactions); notifications get a connection and a thread of their own (:meth:`on_queued`).
    Nothing connects until the first call, so a daemon starts while the database is down.
    """

    backend = "postgresql"
    _FOR_UPDATE = " FOR UPDATE"
    _SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"
    _EXTRA_COLUMN = "extra"

    def __init__(self, url: str, *, host_id: str, inboxes: Mapping[str, Any] | None = None,
                 lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        super().__init__(host_id=host_id, inboxes=inboxes, lease_seconds=lease_seconds)
        self.url = url
        self._conninfo = make_conninfo("", **{**CONNECTION_DEFAULTS, "application_name": f"whisperd {host_id}"[:63],
                                              **conninfo_to_dict(url)})
        self._lock = threading.RLock()
        self._conn: psycopg.Connection[Any] | None = None
        self._closed = False
        self._retry_at = 0.0
        self._listener: _Listener | None = None

    @property
    def location(self) -> str:
        return safe_url(self.url)

    # -- connection and schema -------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._closed:
            raise JobStoreError(f"{self.location}: job store is closed")
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self._conn = None
        if time.monotonic() < self._retry_at:
            raise JobStoreUnavailable(f"{self.location}: not reachable (retrying)")
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.OperationalError as exc:
            self._retry_at = time.monotonic() + RECONNECT_PAUSE_S
            raise _unavailable(self.location, exc) from None
        try:
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                conn.execute("CREATE TABLE IF NOT EXISTS whisperd_schema (version integer NOT NULL)")
                row = conn.execute("SELECT version FROM whisperd_schema").fetchone()
                version = 0 if row is None else int(row[0])
                if version > SCHEMA_VERSION:
                    raise JobStoreError(
                        f"{self.location}: job database schema version {version} is newer than this whisperd "
                        f"understands ({SCHEMA_VERSION}); upgrade whisperd on every host")
                for step in range(version, SCHEMA_VERSION):
                    for statement in split_sql(_MIGRATIONS[step]):
                        conn.execute(statement)
                if row is None:
                    conn.execute("INSERT INTO whisperd_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
                elif version != SCHEMA_VERSION:
                    conn.execute("UPDATE whisperd_schema SET version = %s", (SCHEMA_VERSION,))
        except psycopg.OperationalError as exc:
            raise _unavailable(self.location, exc) from None
        except psycopg.Error as exc:
            raise JobStoreError(f"{self.location}: cannot create or upgrade the job tables: {exc}".strip()) from None

    @contextmanager
    def _transaction(self) -> Iterator[_PgTx]:
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction():
                    yield _PgTx(conn)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                if conn.broken or conn.closed:
                    self._conn = None
                raise _unavailable(self.location, exc) from None
            except psycopg.Error as exc:
                raise JobStoreError(f"{self.location}: {type(exc).__name__}: {exc}".strip()) from None

    _reading = _transaction

    # The hooks below take this store's own transaction type, narrower than the base's Tx protocol:
    # the base only ever hands a store the transactions it opened (type: ignore[override]).
    def _now(self, tx: _PgTx, now: float | None) -> float:  # type: ignore[override]
        if now is not None:
            return now
        row = tx.one("SELECT EXTRACT(EPOCH FROM now())::float8")
        assert row is not None
        return float(row[0])

    def _lock_identity(self, tx: _PgTx, inbox: str, rel: bytes) -> None:  # type: ignore[override]
        tx.run("SELECT pg_advisory_xact_lock(:key)", {"key": identity_lock_key(inbox, rel)})

    def _notify_queued(self, tx: _PgTx) -> None:  # type: ignore[override]
        tx.run(f"NOTIFY {CHANNEL}")

    def _json(self, value: Mapping[str, Any]) -> Any:
        return Jsonb(dict(value))

    def on_queued(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if self._listener is None:
                self._listener = _Listener(self._conninfo, callback)
                self._listener.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._listener is not None:
                self._listener.stop()
                self._listener = None
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def check_writable(self) -> None:
        """Connect, create or upgrade the tables, and prove this role may change rows."""
        with self._transaction() as tx:
            tx.run("UPDATE jobs SET id = id WHERE false")

    @property
    def schema_version(self) -> int:
        with self._reading() as tx:
            row = tx.one("SELECT version FROM whisperd_schema")
        return 0 if row is None else int(row[0])

    def schema_problems(self) -> list[str]:
        """What keeps the daemon from using this database, found without changing it (check-config)."""
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            return [f"cannot connect to {self.location}: {str(exc).strip()}"]
        with conn:
            try:
                table = conn.execute("SELECT to_regclass('whisperd_schema')").fetchone()
                row = conn.execute("SELECT version FROM whisperd_schema").fetchone() if table and table[0] else None
                may_create = conn.execute("SELECT has_schema_privilege(current_schema(), 'CREATE')").fetchone()
            except psycopg.Error as exc:
                return [f"{self.location}: cannot read the job tables: {str(exc).strip()}"]
        version = 0 if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            return [f"{self.location}: job database schema version {version} is newer than this whisperd "
                    f"understands ({SCHEMA_VERSION}); upgrade whisperd"]
        if version < SCHEMA_VERSION and not (may_create and may_create[0]):
            action = "create" if version == 0 else "upgrade"
            return [f"{self.location}: this role may not {action} the job tables (no CREATE privilege on the "
                    "schema): grant it, or create them once as the database owner"]
        return []


def _unavailable(location: str, exc: BaseException) -> JobStoreUnavailable:
    return JobStoreUnavailable(f"{location}: {str(exc).strip() or type(exc).__name__}")


class _Listener(threading.Thread):
    """LISTEN on a connection of its own and call back on every notification; reconnects with
    backoff, and calls back once after each (re)connect for what it may have missed meanwhile."""

    def __init__(self, conninfo: str, callback: Callable[[], None]) -> None:
        super().__init__(name="whisperd-listen", daemon=True)
        self._conninfo = conninfo
        self._callback = callback
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()
        if self is not threading.current_thread():
            self.join(5)

    def run(self) -> None:
        delay = 0.5
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    delay = 0.5
                    self._callback()
                    while not self._stopping.is_set():
                        for _ in conn.notifies(timeout=1.0):
                            self._callback()
            except psycopg.Error as exc:
                log.debug("job notifications interrupted", error=str(exc).strip(), retry_in_seconds=delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, LISTEN_BACKOFF_MAX_S)
