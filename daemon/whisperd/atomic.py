"""Write files so that a reader sees the old content or the new, never half of one.

Inbox folders are writable by other people, so nothing at a predictable name is trusted: each
temp file is created new (`mkstemp`: O_CREAT|O_EXCL|O_NOFOLLOW, so a planted link or file at
that name makes the create fail instead of being followed or reused), and only the file this
process created is renamed into place (checked by inode just before the rename). A symlink
planted at the final name is replaced, never written through: rename() acts on the link itself.

Several files that belong together (a recording's .txt, .srt, ...) are staged first and renamed
together: a full disk or a vanished recording fails before any of them is in place, and if a
rename fails half-way the ones already renamed are taken back out, so a folder never keeps a
partial set from a failed attempt.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from whisperd.naming import check_name_fits, temp_prefix_for


@dataclass(frozen=True, slots=True)
class StagedFile:
    """A complete, fsynced temp file waiting to be renamed onto `target`."""

    temp: Path
    target: Path
    device: int
    inode: int


def current_umask() -> int:
    """The process umask, read without changing it (os.umask would race other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def mode_like(source_mode: int) -> int:
    """Permissions for a file derived from another: never more readable or writable than the source."""
    return (source_mode & 0o666) & ~current_umask()


def stage_bytes(target: Path, data: bytes, mode: int | None = None) -> StagedFile:
    """Create a fresh temp file beside `target` with `data` and `mode`, fsynced; nothing is replaced yet."""
    check_name_fits(target)
    fd, name = tempfile.mkstemp(prefix=temp_prefix_for(target), dir=target.parent)
    temp = Path(name)
    try:
        os.fchmod(fd, (0o666 & ~current_umask()) if mode is None else mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return StagedFile(temp, target, st.st_dev, st.st_ino)


def encode_text(text: str) -> bytes:
    """UTF-8; a file name that is not valid UTF-8 (surrogate-escaped) is written as `\\udcXX`, not an error."""
    return text.encode("utf-8", "backslashreplace")


def commit(staged: Sequence[StagedFile], before_rename: Callable[[], None] | None = None) -> None:
    """Rename every staged file onto its target, then fsync the folders.

    `before_rename` runs once all are staged (it may raise to abandon the set, say because the
    recording was deleted meanwhile). On any failure no temp file is left and targets renamed by
    this call are removed again.
    """
    renamed: list[Path] = []
    try:
        if before_rename is not None:
            before_rename()
        for item in staged:
            st = os.lstat(item.temp)
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (item.device, item.inode):
                raise OSError(f"temp file {item.temp.name} was replaced by someone else; not renaming it")
            os.replace(item.temp, item.target)
            renamed.append(item.target)
    except BaseException:
        for item in staged:
            item.temp.unlink(missing_ok=True)
        for target in renamed:
            target.unlink(missing_ok=True)
        raise
    for folder in dict.fromkeys(item.target.parent for item in staged):
        fsync_dir(folder)


def discard(staged: Sequence[StagedFile]) -> None:
    for item in staged:
        item.temp.unlink(missing_ok=True)


def atomic_write_text(target: Path, text: str, mode: int | None = None) -> None:
    """Write `text` to `target` via a fresh temp file, fsync and rename, then fsync the folder."""
    commit([stage_bytes(target, encode_text(text), mode)])


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
