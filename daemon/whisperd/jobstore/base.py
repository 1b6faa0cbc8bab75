"""The job queue's contract, written once over the SQL that both backends share.

Identity. A job is keyed by the audio file's identity ``(inbox id, path relative to the inbox,
size, mtime_ns)``. Relative to an inbox *id*, not to a mount point, so that hosts that mount one
share at different paths agree on it; each host maps it back to its own absolute path
(:class:`InboxMap`). A path outside every configured inbox keeps its absolute path, under the
root inbox ``""``.

* the same file with a new size or mtime is a *replaced* file and becomes a new job;
* the same identity seen again (a repeated event, a rescan, a restart, another host's watcher) is
  not a new job, whatever state its row is in - this makes the watchers' "at least once" into
  "exactly once";
* rows of older identities stay as history. An older identity still *queued* when a newer one
  arrives is marked ``superseded``; if that exact identity comes back later (a backup restored with
  ``cp -p``), the superseded row is revived, because it never produced a transcript.

Paths are stored as bytes so that names that are not valid UTF-8 round-trip exactly.

Attempts. ``attempts`` counts *unsuccessful* attempts (``mark_retry``, ``mark_failed``). A clean
hand-back (``requeue``) does not count. Whether a failed attempt is retried, and when, is decided
above the store by the one retry policy (whisperd.retry); the store only records transitions.

Leases. ``claim_next`` makes this host the job's *owner*, adds one to its *token* and sets a lease
expiry; the owner renews the lease while its worker runs. A running job whose lease has expired
belongs to nobody: any host may put it back (through the retry policy) with ``expired=True``.
Transitions given a ``token`` are fenced: a host that lost its claim (the job was taken back and
claimed again) is refused with :class:`JobStateError` instead of overwriting the new owner's work.

Times are epoch seconds on the database's clock (the only clock all hosts share); every method
that compares with "now" accepts ``now=`` for tests.

Over 500 lines as one idea: the job store's contract, the state rules and fencing written once
over the SQL both backends share.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Final, Protocol


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
DEFAULT_LEASE_SECONDS: Final = 120.0
#: The inbox id of paths outside every configured inbox (their "relative" path is absolute).
ROOT_INBOX: Final = ""


class JobStoreError(RuntimeError):
    """The database cannot be used (written by a newer whisperd, wrong credentials, ...)."""


class JobStoreUnavailable(JobStoreError):
    """The database cannot be reached right now (network down, server restarting): try again later.
    Nothing was changed by the call that raised it."""


class JobStateError(ValueError):
    """A state change was asked for a job that is not in a state allowing it, or by a claimer
    that no longer holds the job (fencing token mismatch). Raised instead of silently
    overwriting: two workers must never both believe they own a job."""


def storable(text: str | None) -> str | None:
    """Text for a TEXT column: a file name that is not UTF-8 (surrogate-escaped) is kept as `\\udcXX`
    instead of failing the statement, which would leave the job in its old state."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class Job:
    """One row of the queue, as read at one moment (a snapshot: it does not follow the database)."""

    id: int
    path: Path  # on this host
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
    inbox: str = ROOT_INBOX
    rel_path: bytes = b""
    owner: str | None = None  # host id of the last claimer
    token: int = 0  # claims so far: the fencing token of the current (or last) claim
    lease_expires: float | None = None

    @property
    def identity(self) -> tuple[str, bytes, int, int]:
        """``(inbox, rel_path, size, mtime_ns)``: what makes two sightings of a file the same job."""
        return (self.inbox, self.rel_path, self.size, self.mtime_ns)

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES


class InboxMap:
    """Where each inbox id is on this host; maps absolute paths to identities and back."""

    def __init__(self, inboxes: Mapping[str, str | os.PathLike[str]] | None = None) -> None:
        self.roots = {key: Path(os.path.abspath(os.fspath(p))) for key, p in (inboxes or {}).items()}

    def locate(self, path: str | os.PathLike[str]) -> tuple[str, bytes]:
        """``(inbox id, relative path)`` of the innermost inbox holding ``path`` (absolute, not
        symlink-resolved: what the watcher reports), or the root inbox with the absolute path."""
        absolute = Path(os.path.abspath(os.fspath(path)))
        best: tuple[str, Path] | None = None
        for key, root in self.roots.items():
            if absolute.is_relative_to(root) and (best is None or len(root.parts) > len(best[1].parts)):
                best = (key, root)
        if best is None or absolute == best[1]:
            return ROOT_INBOX, os.fsencode(absolute)
        return best[0], os.fsencode(absolute.relative_to(best[1]).as_posix())

    def local_path(self, inbox: str, rel: bytes) -> Path | None:
        """The path on this host, or None for an inbox this host does not have."""
        if inbox == ROOT_INBOX:
            return Path(os.fsdecode(rel))
        root = self.roots.get(inbox)
        return None if root is None else root / os.fsdecode(rel)


@dataclass(frozen=True)
class HookDelivery:
    """One event for one completion hook, kept in the outbox until it is delivered or given up."""

    id: str  # stable across retries: the webhook-id, the exec hook's WHISPERD_DELIVERY_ID
    job_id: int
    hook: str
    payload: Mapping[str, Any] = field(hash=False, compare=False)
    state: str = "pending"
    attempts: int = 0
    last_error: str | None = None
    created_at: float = 0.0
    finished_at: float | None = None


#: A hook event to record with a job's final state: ``(hook name, event payload)``.
HookEvent = tuple[str, Mapping[str, Any]]


class Tx(Protocol):
    """One connection inside one transaction (or an autocommit read). SQL uses ``:name`` parameters."""

    def one(self, sql: str, params: Mapping[str, Any] | None = None) -> Sequence[Any] | None: ...

    def all(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Sequence[Any]]: ...

    def run(self, sql: str, params: Mapping[str, Any] | None = None) -> int: ...


_COLUMNS: Final = (
    "id, inbox, rel_path, size, mtime_ns, state, attempts, last_error, enqueued_at, started_at, finished_at,"
    " not_before, audio_seconds, wall_seconds, language, worker_pid, owner, token, lease_expires"
)
_IDENTITY: Final = "inbox = :inbox AND rel_path = :rel"
_DELIVERY_COLUMNS: Final = "id, job_id, hook, payload, state, attempts, last_error, created_at, finished_at"


class JobStore(ABC):
    """The persistent job queue; safe to share between threads, one instance per process.

    Subclasses provide connections, transactions and the database clock; the states, identity
    rules and fencing live here, once, so both backends pass the same contract tests.
    """

    backend: ClassVar[str]
    #: Appended to a read that precedes an update in the same transaction (row lock), and to the
    #: claim's select (skip rows other claimers hold). Empty where the transaction is exclusive.
    _FOR_UPDATE: ClassVar[str] = ""
    _SKIP_LOCKED: ClassVar[str] = ""
    #: Extra selected columns (after the common ones) and the name of the JSON side-data column.
    _EXTRA_COLUMN: ClassVar[str] = "extra_json"

    def __init__(self, *, host_id: str, inboxes: Mapping[str, str | os.PathLike[str]] | None,
                 lease_seconds: float) -> None:
        if not host_id:
            raise ValueError("host_id must not be empty")
        self.host_id = host_id
        self.lease_seconds = float(lease_seconds)
        self.inboxes = InboxMap(inboxes)

    # -- what a backend provides ---------------------------------------------------------------

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Tx]:
        """A write transaction: reads inside it see a state no other claimer changes before commit
        (SQLite: BEGIN IMMEDIATE; PostgreSQL: row locks via ``_FOR_UPDATE``)."""

    @abstractmethod
    def _reading(self) -> AbstractContextManager[Tx]:
        """A connection for reads only (no write lock: `whisperd status` runs beside the daemon)."""

    @abstractmethod
    def _now(self, tx: Tx, now: float | None) -> float:
        """``now`` when given (tests), else the database's clock."""

    @abstractmethod
    def close(self) -> None:
        """Close connections; further calls raise :class:`JobStoreError`."""

    @abstractmethod
    def check_writable(self) -> None:
        """Fail now, not at the first job, when the database cannot be written."""

    @property
    @abstractmethod
    def schema_version(self) -> int: ...

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the jobs are, for status and logs (never a password)."""

    def _lock_identity(self, tx: Tx, inbox: str, rel: bytes) -> None:  # noqa: B027 - optional hook, no-op here
        """Serialise enqueues of one path across hosts (a no-op where transactions are exclusive)."""

    def _notify_queued(self, tx: Tx) -> None:  # noqa: B027 - optional hook, no-op here
        """Tell idle hosts that a job became claimable (on commit)."""

    def _json(self, value: Mapping[str, Any]) -> Any:
        return json.dumps(dict(value))

    def _insert_columns(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Backend-only columns of a new row."""
        return {}

    def _fallback_path(self, row: Sequence[Any], inbox: str, rel: bytes) -> Path:
        """The path to show for an inbox this host does not have."""
        return Path(f"{inbox}:") / os.fsdecode(rel)

    def on_queued(self, callback: Callable[[], None]) -> None:  # noqa: B027 - optional hook, no-op here
        """Call ``callback`` (from another thread) when another process queues a job. Polling stays
        the fallback, so a backend without notifications does nothing."""

    def set_inboxes(self, inboxes: Mapping[str, str | os.PathLike[str]]) -> None:
        """The inboxes changed (reload)."""
        self.inboxes = InboxMap(inboxes)

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- producing -------------------------------------------------------------------------------

    def enqueue(self, path: str | os.PathLike[str], size: int, mtime_ns: int, *,
                extra: Mapping[str, Any] | None = None, now: float | None = None) -> Job | None:
        """Queue the file with this identity; ``None`` if that identity is already known.

        "Already known" covers every state, so watchers on any number of hosts may report a file as
        often as they like. A ``superseded`` row is revived instead (that version never finished).
        Queued rows of *other* identities of the same path become ``superseded``.
        """
        inbox, rel = self.inboxes.locate(path)
        key = {"inbox": inbox, "rel": rel, "size": size, "mtime_ns": mtime_ns}
        with self._transaction() as tx:
            self._lock_identity(tx, inbox, rel)
            now = self._now(tx, now)
            row = tx.one(f"SELECT id, state FROM jobs WHERE {_IDENTITY} AND size = :size AND mtime_ns = :mtime_ns"
                         + self._FOR_UPDATE, key)
            if row is not None and row[1] != SUPERSEDED:
                return None
            if row is None:
                values = {"inbox": inbox, "rel_path": rel, "size": size, "mtime_ns": mtime_ns, "state": "queued",
                          "enqueued_at": now, "not_before": 0.0, self._EXTRA_COLUMN: self._json(extra or {}),
                          **self._insert_columns(path)}
                columns, marks = ", ".join(values), ", ".join(f":{k}" for k in values)
                inserted = tx.one(f"INSERT INTO jobs ({columns}) VALUES ({marks}) ON CONFLICT DO NOTHING RETURNING id",
                                  values)
                if inserted is None:  # the same identity, queued by someone else meanwhile
                    return None
                job_id = int(inserted[0])
            else:
                job_id = int(row[0])
                tx.run("UPDATE jobs SET state = 'queued', enqueued_at = :now, finished_at = NULL, not_before = 0,"
                       " last_error = NULL WHERE id = :id", {"now": now, "id": job_id})
            tx.run(f"UPDATE jobs SET state = 'superseded', finished_at = :now, last_error = :why"
                   f" WHERE {_IDENTITY} AND state = 'queued' AND id != :id",
                   {**key, "now": now, "id": job_id, "why": f"superseded by job {job_id}"})
            self._notify_queued(tx)
            return self._get(tx, job_id)

    # -- consuming -------------------------------------------------------------------------------

    def claim_next(self, now: float | None = None, *, worker_pid: int | None = None) -> Job | None:
        """Atomically move the oldest claimable queued job to ``running``, owned by this host
        under a new token and lease, and return it; ``None`` when nothing is claimable.

        Claimable means ``not_before <= now`` (retry backoff). Oldest is by enqueue order, so a
        retried job keeps its place once its backoff is over.
        """
        pid = os.getpid() if worker_pid is None else worker_pid
        with self._transaction() as tx:
            now = self._now(tx, now)
            row = tx.one("SELECT id FROM jobs WHERE state = 'queued' AND not_before <= :now ORDER BY id LIMIT 1"
                         + self._SKIP_LOCKED, {"now": now})
            if row is None:
                return None
            tx.run("UPDATE jobs SET state = 'running', started_at = :now, finished_at = NULL, worker_pid = :pid,"
                   " owner = :owner, token = token + 1, lease_expires = :expires WHERE id = :id",
                   {"now": now, "pid": pid, "owner": self.host_id, "expires": now + self.lease_seconds,
                    "id": row[0]})
            return self._get(tx, int(row[0]))

    def renew(self, job_id: int, token: int, *, now: float | None = None) -> float:
        """Extend the lease of our claim ``token``; returns the new expiry. A lease that expired is
        still renewed while nobody has taken the job back. JobStateError: the claim is lost."""
        with self._transaction() as tx:
            now = self._now(tx, now)
            expires = now + self.lease_seconds
            if not tx.run("UPDATE jobs SET lease_expires = :expires WHERE id = :id AND state = 'running'"
                          " AND token = :token", {"expires": expires, "id": job_id, "token": token}):
                raise JobStateError(f"job {job_id}: claim {token} is lost (the job was taken back)")
            return expires

    def next_claimable_at(self) -> float | None:
        """Earliest ``not_before`` among queued jobs (0 if one is claimable at any time), or
        ``None`` when the queue is empty - lets a worker sleep exactly until a backoff ends."""
        with self._reading() as tx:
            row = tx.one("SELECT MIN(not_before) FROM jobs WHERE state = 'queued'")
        return None if row is None or row[0] is None else float(row[0])

    def mark_done(self, job_id: int, audio_seconds: float | None, wall_seconds: float | None,
                  language: str | None, *, extra: Mapping[str, Any] | None = None, now: float | None = None,
                  token: int | None = None, hooks: Sequence[HookEvent] = ()) -> Job:
        """``running`` → ``done``, recording what the run measured; ``extra`` is merged into the
        job's JSON side data. With ``token``, a repeat of a ``mark_done`` that already committed
        (its reply lost with the connection) returns the job instead of failing."""
        with self._transaction() as tx:
            now = self._now(tx, now)
            job = self._get(tx, job_id, lock=True)
            if token is not None and job is not None and job.state == DONE and job.token == token:
                return job
            job = self._check(job, job_id, (RUNNING,), token)
            tx.run(f"UPDATE jobs SET state = 'done', finished_at = :now, audio_seconds = :audio,"
                   f" wall_seconds = :wall, language = :language, {self._EXTRA_COLUMN} = :extra, not_before = 0,"
                   " lease_expires = NULL WHERE id = :id",
                   {"now": now, "audio": audio_seconds, "wall": wall_seconds, "language": language,
                    "extra": self._json({**job.extra, **(extra or {})}), "id": job_id})
            done = self._require_get(tx, job_id)
            self._add_deliveries(tx, done, hooks, now)
            return done

    def mark_retry(self, job_id: int, error: str, backoff_s: float, *, now: float | None = None,
                   token: int | None = None, expired: bool = False) -> Job:
        """``running`` → ``queued`` after an error: one more attempt counted, not claimable for
        ``backoff_s`` seconds. ``expired``: only if the claim's lease has run out (another host
        taking back a job whose owner stopped renewing)."""
        with self._transaction() as tx:
            now = self._now(tx, now)
            self._check(self._get(tx, job_id, lock=True), job_id, (RUNNING,), token, now if expired else None)
            tx.run("UPDATE jobs SET state = 'queued', attempts = attempts + 1, last_error = :error,"
                   " not_before = :not_before, started_at = NULL, worker_pid = NULL, lease_expires = NULL"
                   " WHERE id = :id",
                   {"error": storable(error), "not_before": now + max(0.0, backoff_s), "id": job_id})
            self._notify_queued(tx)
            return self._require_get(tx, job_id)

    def mark_failed(self, job_id: int, error: str, *, now: float | None = None, token: int | None = None,
                    expired: bool = False, hooks: Sequence[HookEvent] = ()) -> Job:
        """→ ``failed`` for good (the failing attempt is counted). Allowed from ``queued`` too, so a
        job can be failed without running it (e.g. its folder's rule file is broken)."""
        with self._transaction() as tx:
            now = self._now(tx, now)
            self._check(self._get(tx, job_id, lock=True), job_id, (RUNNING, QUEUED), token, now if expired else None)
            tx.run("UPDATE jobs SET state = 'failed', attempts = attempts + 1, last_error = :error,"
                   " finished_at = :now, lease_expires = NULL WHERE id = :id",
                   {"error": storable(error), "now": now, "id": job_id})
            failed = self._require_get(tx, job_id)
            self._add_deliveries(tx, failed, hooks, now)
            return failed

    def mark_superseded(self, job_id: int, reason: str, *, now: float | None = None,
                        token: int | None = None) -> Job:
        """→ ``superseded``: the file changed or went away under a claimed or queued job."""
        with self._transaction() as tx:
            now = self._now(tx, now)
            self._check(self._get(tx, job_id, lock=True), job_id, (RUNNING, QUEUED), token)
            tx.run("UPDATE jobs SET state = 'superseded', last_error = :reason, finished_at = :now,"
                   " lease_expires = NULL WHERE id = :id", {"reason": storable(reason), "now": now, "id": job_id})
            return self._require_get(tx, job_id)

    def requeue(self, job_id: int, *, error: str | None = None, now: float | None = None,
                token: int | None = None) -> Job:
        """``running`` → ``queued``, claimable at once, no attempt counted: the clean hand-back
        (SIGTERM during a job). A failed attempt goes through ``mark_retry`` or ``mark_failed``."""
        with self._transaction() as tx:
            self._check(self._get(tx, job_id, lock=True), job_id, (RUNNING,), token)
            tx.run("UPDATE jobs SET state = 'queued', not_before = 0, started_at = NULL, worker_pid = NULL,"
                   " lease_expires = NULL, last_error = COALESCE(:error, last_error) WHERE id = :id",
                   {"error": storable(error), "id": job_id})
            self._notify_queued(tx)
            return self._require_get(tx, job_id)

    def retry_failed(self, paths: Iterable[str | os.PathLike[str]] | None = None) -> list[Job]:
        """``failed`` → ``queued``, claimable at once with a fresh count of attempts: ``whisperd retry``
        once the cause is fixed (a rule file, a missing codec). Only a path's latest job is retried
        (an older identity of a file that has changed since is history), so ``paths=None`` (every
        failed job) never revives a replaced version. ``last_error`` stays until the job finishes."""
        with self._transaction() as tx:
            latest = ("state = 'failed' AND NOT EXISTS (SELECT 1 FROM jobs AS newer WHERE newer.inbox = jobs.inbox"
                      " AND newer.rel_path = jobs.rel_path AND newer.id > jobs.id)")
            if paths is None:
                ids = [int(r[0]) for r in tx.all(f"SELECT id FROM jobs WHERE {latest} ORDER BY id" + self._FOR_UPDATE)]
            else:
                ids = []
                for path in paths:
                    row = tx.one(f"SELECT id FROM jobs WHERE {_IDENTITY} AND {latest}" + self._FOR_UPDATE,
                                 self._where_path(path))
                    if row is not None and int(row[0]) not in ids:
                        ids.append(int(row[0]))
            for job_id in ids:
                tx.run("UPDATE jobs SET state = 'queued', attempts = 0, not_before = 0, started_at = NULL,"
                       " finished_at = NULL, worker_pid = NULL, lease_expires = NULL WHERE id = :id", {"id": job_id})
            if ids:
                self._notify_queued(tx)
            return [self._require_get(tx, job_id) for job_id in ids]

    # -- the completion hooks' outbox -------------------------------------------------------------

    def _add_deliveries(self, tx: Tx, job: Job, hooks: Sequence[HookEvent], now: float) -> None:
        """In the transaction that finishes the job: a crash after it commits loses no event, and
        one before it leaves the job unfinished, to be run (and reported) again."""
        for hook, payload in hooks:
            delivery_id = f"whisperd-{job.id}-{job.token}-{job.state}-{hook}"
            tx.run("INSERT INTO hook_deliveries (id, job_id, hook, owner, payload, created_at)"
                   " VALUES (:id, :job, :hook, :owner, :payload, :now) ON CONFLICT DO NOTHING",
                   {"id": delivery_id, "job": job.id, "hook": hook, "owner": self.host_id, "now": now,
                    "payload": json.dumps({**payload, "delivery_id": delivery_id})})

    def due_deliveries(self, limit: int = 20, *, now: float | None = None) -> list[HookDelivery]:
        """This host's pending deliveries whose time has come, oldest first."""
        with self._reading() as tx:
            now = self._now(tx, now)
            return [self._delivery(r) for r in tx.all(
                f"SELECT {_DELIVERY_COLUMNS} FROM hook_deliveries WHERE owner = :owner AND state = 'pending'"
                f" AND next_at <= :now ORDER BY created_at, id LIMIT {int(limit)}",
                {"owner": self.host_id, "now": now})]

    def next_delivery_at(self) -> float | None:
        """When this host's next pending delivery is due, or None when there is none."""
        with self._reading() as tx:
            row = tx.one("SELECT MIN(next_at) FROM hook_deliveries WHERE owner = :owner AND state = 'pending'",
                         {"owner": self.host_id})
        return None if row is None or row[0] is None else float(row[0])

    def delivery_attempted(self, delivery_id: str, *, error: str | None = None, retry_in: float | None = None,
                           now: float | None = None) -> None:
        """One attempt's result: delivered (no ``error``), tried again in ``retry_in`` seconds, or failed."""
        state = "delivered" if error is None else "pending" if retry_in is not None else "failed"
        with self._transaction() as tx:
            now = self._now(tx, now)
            tx.run("UPDATE hook_deliveries SET state = :state, attempts = attempts + 1, last_error = :error,"
                   " next_at = :next_at, finished_at = :finished WHERE id = :id AND state = 'pending'",
                   {"state": state, "error": storable(error), "next_at": now + (retry_in or 0.0),
                    "finished": None if state == "pending" else now, "id": delivery_id})

    def failed_deliveries(self, limit: int = 10) -> list[HookDelivery]:
        """Deliveries given up (every host's), most recent first: listed by ``whisperd status``."""
        with self._reading() as tx:
            return [self._delivery(r) for r in tx.all(
                f"SELECT {_DELIVERY_COLUMNS} FROM hook_deliveries WHERE state = 'failed'"
                f" ORDER BY finished_at DESC, id LIMIT {int(limit)}")]

    @staticmethod
    def _delivery(row: Sequence[Any]) -> HookDelivery:
        id_, job_id, hook, payload, state, attempts, last_error, created_at, finished_at = row
        return HookDelivery(id=id_, job_id=int(job_id), hook=hook, payload=json.loads(payload), state=state,
                            attempts=int(attempts), last_error=last_error, created_at=created_at,
                            finished_at=finished_at)

    # -- reading ---------------------------------------------------------------------------------

    def get(self, job_id: int) -> Job | None:
        """The job with this id, or ``None``."""
        with self._reading() as tx:
            return self._get(tx, job_id)

    def counts(self) -> dict[str, int]:
        """Number of jobs per state (every host's), every state present (zeros included)."""
        result: dict[str, int] = dict.fromkeys(STATES, 0)
        with self._reading() as tx:
            for state, n in tx.all("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
                result[JobState(state)] = int(n)
        return result

    def running(self, owner: str | None = None) -> list[Job]:
        """Jobs currently claimed, oldest claim first; with ``owner``, only that host's (and rows
        claimed before owners were recorded)."""
        if owner is None:
            return self._jobs("WHERE state = 'running' ORDER BY started_at, id")
        return self._jobs("WHERE state = 'running' AND (owner = :owner OR owner IS NULL) ORDER BY started_at, id",
                          {"owner": owner})

    def expired(self, now: float | None = None) -> list[Job]:
        """Running jobs whose lease has run out: their owner died, hangs or lost the database."""
        with self._reading() as tx:
            now = self._now(tx, now)
            return [self._job(r) for r in tx.all(
                f"SELECT {self._columns()} FROM jobs WHERE state = 'running' AND lease_expires < :now ORDER BY id",
                {"now": now})]

    def queued(self, limit: int | None = None) -> list[Job]:
        """Queued jobs in claim order (backoff ignored)."""
        return self._jobs("WHERE state = 'queued' ORDER BY id" + _limit(limit))

    def recent_failures(self, limit: int = 20) -> list[Job]:
        """Jobs that ended ``failed``, most recent first - what an operator looks at first."""
        return self._jobs("WHERE state = 'failed' ORDER BY finished_at DESC, id DESC" + _limit(limit))

    def recent_done(self, limit: int = 10) -> list[Job]:
        """Jobs that ended ``done``, most recent first."""
        return self._jobs("WHERE state = 'done' ORDER BY finished_at DESC, id DESC" + _limit(limit))

    def latest_for_path(self, path: str | os.PathLike[str]) -> Job | None:
        """The most recently created row for this path (any identity, any state)."""
        jobs = self._jobs(f"WHERE {_IDENTITY} ORDER BY id DESC LIMIT 1", self._where_path(path))
        return jobs[0] if jobs else None

    def history_for_path(self, path: str | os.PathLike[str]) -> list[Job]:
        """Every row for this path, oldest first (older identities included)."""
        return self._jobs(f"WHERE {_IDENTITY} ORDER BY id", self._where_path(path))

    # -- helpers -------------------------------------------------------------------------------

    def _where_path(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        inbox, rel = self.inboxes.locate(path)
        return {"inbox": inbox, "rel": rel}

    def _columns(self) -> str:
        return f"{_COLUMNS}, {self._EXTRA_COLUMN}"

    def _jobs(self, where: str, params: Mapping[str, Any] | None = None) -> list[Job]:
        with self._reading() as tx:
            return [self._job(r) for r in tx.all(f"SELECT {self._columns()} FROM jobs {where}", params)]

    def _get(self, tx: Tx, job_id: int, *, lock: bool = False) -> Job | None:
        row = tx.one(f"SELECT {self._columns()} FROM jobs WHERE id = :id" + (self._FOR_UPDATE if lock else ""),
                     {"id": job_id})
        return None if row is None else self._job(row)

    def _require_get(self, tx: Tx, job_id: int) -> Job:
        job = self._get(tx, job_id)
        assert job is not None
        return job

    def _job(self, row: Sequence[Any]) -> Job:
        (id_, inbox, rel, size, mtime_ns, state, attempts, last_error, enqueued_at, started_at, finished_at,
         not_before, audio_seconds, wall_seconds, language, worker_pid, owner, token, lease_expires,
         extra) = row[:20]
        rel = bytes(rel)
        path = self.inboxes.local_path(inbox, rel) or self._fallback_path(row, inbox, rel)
        return Job(
            id=int(id_), path=path, size=size, mtime_ns=mtime_ns, state=JobState(state), attempts=attempts,
            last_error=last_error, enqueued_at=enqueued_at, started_at=started_at, finished_at=finished_at,
            not_before=not_before, audio_seconds=audio_seconds, wall_seconds=wall_seconds, language=language,
            worker_pid=worker_pid, extra=(json.loads(extra) if isinstance(extra, str) else dict(extra or {})),
            inbox=inbox, rel_path=rel, owner=owner, token=int(token or 0), lease_expires=lease_expires,
        )

    @staticmethod
    def _check(job: Job | None, job_id: int, states: tuple[str, ...], token: int | None,
               expired_by: float | None = None) -> Job:
        """The transition's preconditions: the job exists, is in one of ``states``, is still the
        claim ``token`` (fencing) and, with ``expired_by``, its lease ran out before that time."""
        if job is None:
            raise JobStateError(f"job {job_id} does not exist")
        if job.state not in states:
            raise JobStateError(f"job {job_id} is {job.state}, expected {' or '.join(states)}")
        if token is not None and job.token != token:
            raise JobStateError(f"job {job_id}: claim {token} is lost (it is now claim {job.token}, "
                                f"owner {job.owner})")
        if expired_by is not None and (job.lease_expires is None or job.lease_expires >= expired_by):
            raise JobStateError(f"job {job_id}: the lease of {job.owner} has not expired")
        return job


def _limit(limit: int | None) -> str:
    return "" if limit is None else f" LIMIT {int(limit)}"


def split_sql(script: str) -> Iterator[str]:
    """Statements of a migration script, run one by one inside our own transaction."""
    return (s.strip() for s in script.split(";") if s.strip())
