"""The daemon's YAML configuration, validated up front with messages that name the key."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from whisperd.devices import allowed_precisions
from whisperd.errors import WhisperdError
from whisperd.options import DEVICES, EngineSettings, field_choices
from whisperd.rules import RuleSet, describe_validation_error


class ConfigError(WhisperdError, ValueError):
    """The config file cannot be used; the message names the file and the key."""

    permanent = True


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InboxConfig(_Strict):
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                           description="stable name, the same on every host (required with postgresql)")
    path: Path
    recursive: bool = True
    poll: bool = Field(False, description="use polling instead of inotify (NFS/SMB shares deliver no events)")
    follow_links_outside: bool = Field(False, description="transcribe symlinks that lead outside this inbox")
    rules: RuleSet = RuleSet()

    @property
    def inbox_id(self) -> str:
        """What job identities are relative to: the configured id, else the path (one host only)."""
        return self.id or str(self.path)


class EngineSection(EngineSettings):
    """The config's `engine:` section: the engine settings, with the names that need no hardware to
    check validated at load, so a typo is a config error naming the key (the device/precision
    pairing that does need the hardware is checked by whisperd.devices before loading)."""

    @field_validator("backend", "decoder")
    @classmethod
    def _one_of_its_choices(cls, v: str, info: ValidationInfo) -> str:
        """Fields whose declaration lists their choices (the CLI offers the same list)."""
        choices = field_choices(cls.model_fields[str(info.field_name)]) or ()
        if v not in choices:
            raise ValueError(f"use one of {', '.join(choices)}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str, info: ValidationInfo) -> str:
        # OpenVINO also takes its own device names (GPU.1); they are checked when the engine starts.
        if info.data.get("backend", "auto") != "openvino" and v not in DEVICES:
            raise ValueError(f"use one of {', '.join(DEVICES)}")
        return v

    @field_validator("precision")
    @classmethod
    def _precision(cls, v: str, info: ValidationInfo) -> str:
        allowed = allowed_precisions(info.data.get("backend", "auto"))
        if v not in allowed:
            raise ValueError(f"use one of {', '.join(allowed)}")
        return v


class JobConfig(_Strict):
    max_attempts: int = Field(3, ge=1, description="tries before a job is marked failed")
    retry_backoff_seconds: float = Field(10.0, ge=0, description="first retry delay; doubles each attempt")
    timeout_base_seconds: float = Field(120.0, gt=0)
    timeout_per_audio_second: float = Field(2.0, gt=0, description="per-job timeout = base + this x audio length")
    at_once: Literal["auto"] | Annotated[int, Field(ge=1, le=64)] = Field(
        "auto", description="jobs in the worker at once; auto: 32 where their windows share GPU batches, else 1")

    def jobs_at_once(self, engine_suggests: int, engine_shares_batches: bool) -> int:
        """Jobs to run side by side: a number only helps where the engine shares batches across
        them; elsewhere they would only compete for the same cores, so it is one."""
        if self.at_once == "auto":
            return max(1, engine_suggests)
        return self.at_once if engine_shares_batches else 1

    def timeout_for(self, audio_seconds: float | None) -> float:
        # Unknown length (probe failed): allow an hour of audio.
        return self.timeout_base_seconds + self.timeout_per_audio_second * (audio_seconds if audio_seconds else 3600.0)


class JobStoreConfig(_Strict):
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    url: str | None = Field(None, description="libpq URL (postgresql); the password via ~/.pgpass or PGPASSFILE")
    lease_seconds: float = Field(120.0, ge=1, description="a running job's lease; renewed while the worker is alive")


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; an empty host is loopback (never all interfaces by accident)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected host:port, e.g. 127.0.0.1:9857")
    host = host.strip("[]") or "127.0.0.1"
    if host != "localhost":
        ipaddress.ip_address(host)  # ValueError names the bad address
    return host, int(port)


class MetricsConfig(_Strict):
    """`metrics:`: Prometheus metrics over HTTP and/or as a node_exporter textfile."""

    listen: str | None = Field(None, description="host:port of the /metrics endpoint (e.g. 127.0.0.1:9857)")
    textfile: Path | None = Field(None, description="node_exporter textfile, rewritten atomically every 15 s")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is not None:
            parse_listen(v)
        return v


class WebhookConfig(_Strict):
    url: str = Field(pattern=r"^https?://", description="receives a signed JSON POST per event")
    secret_file: Path = Field(description="the signing secret (Standard Webhooks: whsec_<base64>, or raw bytes)")


class HookConfig(_Strict):
    """`hooks.NAME`: a program run, or a webhook called, when a job is done or failed. Only in the
    daemon's config: a folder's rule file cannot make the daemon run anything."""

    exec: list[str] | None = Field(None, min_length=1, description="argv; no shell, no templating")
    webhook: WebhookConfig | None = None
    on: list[Literal["job.done", "job.failed"]] = Field(min_length=1)
    timeout_seconds: float = Field(60.0, gt=0, description="an exec hook's process group is killed after this")
    max_attempts: int = Field(8, ge=1, description="webhook tries on network errors, 408, 429 and 5xx")
    retry_backoff_seconds: float = Field(10.0, ge=0, description="first webhook retry delay; doubles each time")

    @model_validator(mode="after")
    def _one_kind(self) -> HookConfig:
        if (self.exec is None) == (self.webhook is None):
            raise ValueError("give either exec or webhook")
        return self


class DaemonConfig(_Strict):
    inboxes: list[InboxConfig] = Field(min_length=1)
    engine: EngineSection = EngineSection()
    jobs: JobConfig = JobConfig()
    job_store: JobStoreConfig = JobStoreConfig()
    state_dir: Path = Path("/var/lib/whisperd")
    settle_seconds: float = Field(2.0, ge=0)
    rescan_seconds: float = Field(300.0, gt=0)
    stop_timeout_seconds: float = Field(60.0, gt=0, description="on SIGTERM, wait this long for the running job")
    watchdog_seconds: float | None = Field(None, gt=0, description="defaults to systemd's WATCHDOG_USEC / 2")
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    metrics: MetricsConfig | None = None
    hooks: dict[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")], HookConfig] = {}

    @property
    def database_path(self) -> Path:
        return self.state_dir / "jobs.sqlite3"


def job_store_problems(config: DaemonConfig) -> list[str]:
    """What the job_store section and the inbox ids get wrong together, by key."""
    store, problems = config.job_store, []
    if store.backend == "postgresql":
        if not store.url:
            problems.append("key 'job_store.url': required with backend: postgresql")
        else:
            from whisperd.jobstore.postgres import validate_url

            if (bad := validate_url(store.url)) is not None:
                problems.append(f"key 'job_store.url': not a libpq URL or connection string ({bad})")
        problems.extend(f"key 'inboxes.{n}.id': required with job_store.backend: postgresql (a stable name, "
                        "the same on every host)" for n, inbox in enumerate(config.inboxes) if inbox.id is None)
    elif store.url is not None:
        problems.append("key 'job_store.url': only used with backend: postgresql")
    seen: dict[str, int] = {}
    for n, inbox in enumerate(config.inboxes):
        if inbox.inbox_id in seen:
            problems.append(f"key 'inboxes.{n}.id': {inbox.inbox_id!r} is also inbox {seen[inbox.inbox_id]}'s id")
        seen.setdefault(inbox.inbox_id, n)
    return problems


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative paths in the config are relative to the config file's folder, not the working directory."""
    for inbox in data.get("inboxes") or []:
        if isinstance(inbox, dict) and "path" in inbox:
            inbox["path"] = str((base / Path(inbox["path"]).expanduser()).resolve())
    for hook in (data.get("hooks") or {}).values() if isinstance(data.get("hooks"), dict) else ():
        webhook = hook.get("webhook") if isinstance(hook, dict) else None
        if isinstance(webhook, dict) and webhook.get("secret_file"):
            webhook["secret_file"] = str((base / Path(webhook["secret_file"]).expanduser()).resolve())
    metrics = data.get("metrics")
    if isinstance(metrics, dict) and metrics.get("textfile"):
        metrics["textfile"] = str((base / Path(metrics["textfile"]).expanduser()).resolve())
    if "state_dir" in data:
        data["state_dir"] = str((base / Path(data["state_dir"]).expanduser()).resolve())
    return data


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> DaemonConfig:
    """Read and validate the config; `overrides` replaces engine keys (from CLI flags)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with at least 'inboxes'")
    data = _resolve_paths(data, path.parent.resolve())
    if overrides:
        data["engine"] = {**(data.get("engine") or {}), **{k: v for k, v in overrides.items() if v is not None}}
    try:
        config = DaemonConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(str(path), exc)) from None
    if problems := job_store_problems(config):
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return config
