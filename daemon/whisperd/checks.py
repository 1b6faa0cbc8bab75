"""`whisperd check-config`: everything that can be checked without loading a model (and the job
database, when it is a shared one: reachable, and its tables current or creatable)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from whisperd.config import ConfigError, DaemonConfig, InboxConfig, load_config
from whisperd.devices import UnsupportedSettingError, check_engine_settings
from whisperd.rules import RULE_FILE_NAME, RuleError, RuleResolver


def check_config(path: Path) -> list[str]:
    """Problems, one line each; empty when the config and every rule file under its inboxes are usable."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        return [str(exc)]
    problems: list[str] = []
    try:
        check_engine_settings(config.engine.backend, config.engine.device, config.engine.precision)
    except UnsupportedSettingError as exc:
        problems.append(f"{path}: engine: {exc}")
    problems.extend(check_state_dir(path, config.state_dir))
    problems.extend(check_job_store(path, config))
    resolver = RuleResolver()
    for inbox in config.inboxes:
        if not inbox.path.is_dir():
            problems.append(f"{path}: inbox {inbox.path} does not exist (it will be watched once it appears)")
            continue
        for rule_file in rule_files(inbox):
            try:
                resolver.load(rule_file)
            except RuleError as exc:
                problems.append(str(exc))
    return problems


def check_state_dir(config_path: Path, state_dir: Path) -> list[str]:
    """The daemon must create its job database there; say so now rather than at start-up.

    Write permission is not checked: the service usually runs as another user than the one checking.
    """
    existing = next((p for p in (state_dir, *state_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return [f"{config_path}: state_dir {state_dir}: {existing} is not a folder"]
    return []


def check_job_store(config_path: Path, config: DaemonConfig) -> list[str]:
    """A shared job store: the database can be reached with the URL, and its tables are current or
    can be created by this role. Nothing is changed (the URL's syntax was checked at load)."""
    if config.job_store.backend != "postgresql" or config.job_store.url is None:
        return []
    from whisperd.jobstore.postgres import PostgresJobStore

    store = PostgresJobStore(config.job_store.url, host_id="check-config",
                             inboxes={i.inbox_id: i.path for i in config.inboxes})
    return [f"{config_path}: job_store: {problem}" for problem in store.schema_problems()]


def rule_files(inbox: InboxConfig) -> Iterator[Path]:
    """The rule files the daemon would read: not under hidden folders, which it never watches,
    and without following folder symlinks (no loops)."""
    if not inbox.recursive:
        if os.path.lexists(inbox.path / RULE_FILE_NAME):  # a FIFO or a link is reported, not skipped
            yield inbox.path / RULE_FILE_NAME
        return
    for folder, subfolders, files in os.walk(inbox.path):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        if RULE_FILE_NAME in files:
            yield Path(folder) / RULE_FILE_NAME
