"""The persistent job queue: one interface (whisperd.jobstore.base), two backends.

* ``sqlite`` (default): a file in the state directory, nothing else to run; one machine.
* ``postgresql``: one database that several hosts sharing an inbox tree claim from, exactly once.

``open_job_store(config)`` picks the backend from the config's ``job_store`` section.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from whisperd.jobstore.base import (
    DEFAULT_LEASE_SECONDS,
    FINAL_STATES,
    ROOT_INBOX,
    STATES,
    HookDelivery,
    HookEvent,
    InboxMap,
    Job,
    JobState,
    JobStateError,
    JobStore,
    JobStoreError,
    JobStoreUnavailable,
    storable,
)
from whisperd.jobstore.hostid import load_host_id, read_host_id
from whisperd.jobstore.sqlite import SCHEMA_VERSION, SqliteJobStore

if TYPE_CHECKING:
    from whisperd.config import DaemonConfig

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "FINAL_STATES",
    "HookDelivery",
    "HookEvent",
    "ROOT_INBOX",
    "SCHEMA_VERSION",
    "STATES",
    "InboxMap",
    "Job",
    "JobState",
    "JobStateError",
    "JobStore",
    "JobStoreError",
    "JobStoreUnavailable",
    "SqliteJobStore",
    "load_host_id",
    "open_job_store",
    "read_host_id",
    "storable",
]


def open_job_store(config: DaemonConfig, host_id: str | None = None) -> JobStore:
    """The store ``config`` describes, for this host (``host_id`` defaults to the one kept in the
    state directory). PostgreSQL connects at the first call, so this never waits for a network."""
    settings = config.job_store
    inboxes = {inbox.inbox_id: inbox.path for inbox in config.inboxes}
    host = host_id or load_host_id(config.state_dir)
    if settings.backend == "postgresql":
        from whisperd.jobstore.postgres import PostgresJobStore

        assert settings.url is not None  # the config checks this
        return PostgresJobStore(settings.url, host_id=host, inboxes=inboxes, lease_seconds=settings.lease_seconds)
    return SqliteJobStore(config.database_path, host_id=host, inboxes=inboxes, lease_seconds=settings.lease_seconds)
