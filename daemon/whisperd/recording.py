"""Open a recording from an inbox without trusting its name: what it is, where it leads, whether it stays.

Inboxes are written by other people. A name can be a FIFO (opening it for reading would block for
ever), a device, or a symlink to another team's recording outside the inbox: the daemon would then
write that recording's text into this inbox, acting for someone who could not read it. So a
recording is opened once, without blocking, checked on the open descriptor (a regular file, and
by default inside the inbox it was found in, wherever links lead), and read through that
descriptor (`/proc/self/fd/N` reopens the very same file, whatever the name points to later).
Before outputs are put in place, `check_unchanged` makes sure the recording is still there under
its name and unchanged: a file deleted or replaced during the job gets no transcript.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from whisperd.errors import WhisperdError


class RecordingRefused(WhisperdError, OSError):
    """The name does not lead to a recording whisperd may read; trying again will not help."""

    permanent = True


class RecordingGone(WhisperdError, OSError):
    """The recording was deleted or replaced while it was transcribed: its outputs are dropped."""

    permanent = True


def is_inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    return Path(path).is_relative_to(os.path.realpath(root))


@dataclass(slots=True)
class OpenedRecording:
    """An open descriptor of a checked recording; use `read_path` to read it, `close` when done."""

    path: Path
    fd: int
    device: int
    inode: int
    size: int
    mtime_ns: int
    mode: int

    @property
    def read_path(self) -> Path:
        """A name for exactly this open file, valid while it is open (for libraries that take a path)."""
        return Path(f"/proc/self/fd/{self.fd}")

    def check_unchanged(self) -> None:
        """Raise RecordingGone if the file was deleted, or its name now leads to other content."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            raise RecordingGone(f"{self.path.name} was deleted or moved away during the job; "
                                "no transcript was written") from None
        if os.fstat(self.fd).st_nlink == 0 or (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) != (
                self.device, self.inode, self.size, self.mtime_ns):
            raise RecordingGone(f"{self.path.name} was replaced or changed during the job; its new version is queued")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OpenedRecording:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_recording(path: Path, inbox_root: Path | None = None, follow_links_outside: bool = False) -> OpenedRecording:
    """Open `path` for reading without blocking and check what it is.

    With `inbox_root`, the file actually opened (links resolved) must lie inside that inbox unless
    `follow_links_outside`. Raises RecordingRefused (permanent) or FileNotFoundError.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise RecordingRefused(f"{path.name}: cannot open ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RecordingRefused(f"{path.name}: not a regular file ({_kind(st.st_mode)}); only recordings are read")
        if inbox_root is not None and not follow_links_outside:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if not is_inside(target, inbox_root):
                raise RecordingRefused(
                    f"{path.name} is a link to a file outside its inbox; whisperd does not follow such links "
                    "(set follow_links_outside: true on the inbox to allow it)"
                )
    except BaseException:
        os.close(fd)
        raise
    return OpenedRecording(path, fd, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a plain file"
