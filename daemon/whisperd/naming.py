"""The names whisperd gives files beside a recording: outputs, the error note and temp files.

One module owns them, so the writers, the daemon's sweeps and the watcher's ignore rules agree.

Temp names do not grow with the target's name: a recording named close to the 255-byte limit
still gets temp files that fit (`.whisperd-tmp.<tag>.<pid>.<random>`, about 45 bytes). The tag
is a short hash of the target's name, so the temps of one recording can be found and swept
without reading them; the pid says which process wrote it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from whisperd.errors import WhisperdError
from whisperd.options import OUTPUT_FORMATS

TEMP_MARKER = ".whisperd-tmp"
TEMP_PREFIX = TEMP_MARKER + "."
ERROR_SUFFIX = ".error.txt"
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


def temp_prefix_for(target: Path) -> str:
    """Prefix of every temp file written for `target` (hidden, so watchers and users skip it)."""
    return f"{TEMP_PREFIX}{temp_tag(target)}.{os.getpid()}."


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


def stale_temps_for(audio: Path, formats: Iterable[str]) -> list[Path]:
    """Temp files left for this recording's outputs or error note by a killed writer."""
    targets = [*output_paths(audio, formats).values(), error_file_for(audio)]
    tags = {temp_tag(t) for t in targets}
    try:
        names = os.listdir(audio.parent)
    except OSError:
        return []
    return [audio.parent / n for n in names
            if is_temp_name(n) and n[len(TEMP_PREFIX):].split(".", 1)[0] in tags]
