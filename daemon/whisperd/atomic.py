"""Write files so that a reader sees the old content or the new, never half of one."""

from __future__ import annotations

import os
from pathlib import Path

TEMP_MARKER = ".whisperd-tmp"


def temp_path_for(target: Path) -> Path:
    """Hidden temp name in the same folder (same filesystem, so rename is atomic; hidden, so watchers skip it)."""
    return target.with_name(f".{target.name}.{os.getpid()}{TEMP_MARKER}")


def atomic_write_text(target: Path, text: str) -> None:
    """Write `text` to `target` via temp file, fsync and rename, then fsync the folder."""
    tmp = temp_path_for(target)
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
