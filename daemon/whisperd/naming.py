"""The names whisperd gives files beside a recording: outputs, the error note and temp files.

One module owns them, so the writers, the daemon's sweeps and the watcher's ignore rules agree.

Temp names do not grow with the target's name: a recording named close to the 255-byte limit
still gets temp files that fit (`.whisperd-tmp.<tag>.<host>.<pid>.<random>`, about 50 bytes). The
tag is a short hash of the target's name, so the temps of one recording can be found and swept
without reading them; the host (a short hash of the host id) and the pid say who wrote it, so
that hosts sharing an inbox never sweep each other's files while they are being written.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from whisperd.errors import WhisperdError
from whisperd.options import OUTPUT_FORMATS

TEMP_MARKER = ".whisperd-tmp"
TEMP_PREFIX = TEMP_MARKER + "."
ERROR_SUFFIX = ".error.txt"
#: The daemon puts its host id here; the worker processes it starts inherit it.
HOST_ID_ENV = "WHISPERD_HOST_ID"
DEFAULT_NAME_MAX = 255
#: What other programs call files they are still writing (browsers, rsync, editors).
TEMPORARY_SUFFIXES: tuple[str, ...] = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".swp", "~")
#: The files whisperd writes beside a recording: never recordings themselves.
SIDE_FILE_SUFFIXES: tuple[str, ...] = (*(f".{fmt}" for fmt in OUTPUT_FORMATS), ERROR_SUFFIX)


class NameTooLongError(WhisperdError, OSError):
    """An output name would not fit in the folder's name limit: renaming the recording fixes it."""

    permanent = True


def output_paths(audio: Path, formats: Iterable[str]) -> dict[str, Path]:
    """`talk.m4a` -> `talk.txt`, `talk.srt`, ... in the same folder."""
    return {fmt: audio.with_suffix(f".{fmt}") for fmt in formats}


def error_file_for(audio: Path) -> Path:
    return audio.with_name(audio.stem + ERROR_SUFFIX)


def name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return DEFAULT_NAME_MAX


def check_name_fits(target: Path) -> None:
    """Raise NameTooLongError (a permanent failure) when `target`'s name exceeds the folder's limit."""
    size = len(os.fsencode(target.name))
    limit = name_max(target.parent)
    if size > limit:
        raise NameTooLongError(
            f"the output name {target.name[:60]!r}... would be {size} bytes, over this folder's limit of {limit}: "
            "give the recording a shorter name"
        )


def temp_tag(target: Path) -> str:
    return hashlib.sha1(os.fsencode(target.name)).hexdigest()[:10]


def host_tag(host_id: str | None = None) -> str:
    """8 hex digits naming the host in temp names: of `host_id`, else of the id the daemon set in
    the environment, else of the machine's name (a one-shot `whisperd transcribe`)."""
    name = host_id or os.environ.get(HOST_ID_ENV) or socket.gethostname()
    return hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def temp_prefix_for(target: Path) -> str:
    """Prefix of every temp file written for `target` (hidden, so watchers and users skip it)."""
    return f"{TEMP_PREFIX}{temp_tag(target)}.{host_tag()}.{os.getpid()}."


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


def stale_temps_for(audio: Path, formats: Iterable[str], older_than: float | None = None) -> list[Path]:
    """Temp files left for this recording's outputs or error note by a killed writer.

    With `older_than` (seconds), only this host's temps and those of other hosts that are older
    than that (the job lease: their writer is dead or has lost the job); names from before temp
    names carried a host count as this host's.
    """
    targets = [*output_paths(audio, formats).values(), error_file_for(audio)]
    tags = {temp_tag(t) for t in targets}
    mine = host_tag()
    try:
        names = os.listdir(audio.parent)
    except OSError:
        return []
    found = []
    for name in names:
        fields = name[len(TEMP_PREFIX):].split(".") if is_temp_name(name) else []
        if not fields or fields[0] not in tags:
            continue
        theirs = len(fields) >= 4 and fields[1] != mine
        if theirs and older_than is not None and not _older(audio.parent / name, older_than):
            continue
        found.append(audio.parent / name)
    return found


def _older(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.lstat().st_mtime > seconds
    except OSError:
        return False
