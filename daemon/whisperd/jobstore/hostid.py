"""This host's id: who owns a claimed job, and whose temp files are whose.

Kept in the state directory and generated once, so that a restarted daemon recognises its own
claims (and requeues them at once) while the claims of other hosts wait for their lease. The
machine's name alone would not do: two daemons with separate state directories on one machine
are two hosts.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from pathlib import Path
from typing import Final

HOST_ID_FILE: Final = "host-id"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def new_host_id() -> str:
    """``<hostname>-<6 hex>``: readable in `whisperd status`, unique when names repeat."""
    name = _SAFE.sub("-", socket.gethostname()).strip("-")[:40] or "host"
    return f"{name}-{secrets.token_hex(3)}"


def read_host_id(state_dir: Path) -> str | None:
    try:
        text = (state_dir / HOST_ID_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def load_host_id(state_dir: Path) -> str:
    """The id kept in ``state_dir``, created on first use. Two processes creating it at once agree:
    the file is written whole under a temporary name and hard-linked into place, which fails if
    the other was first. A state directory that cannot be written gets an id for this process
    only; the daemon itself checks that its state directory is writable."""
    existing = read_host_id(state_dir)
    if existing:
        return existing
    candidate = new_host_id()
    temp = state_dir / f".{HOST_ID_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(candidate + "\n")
        os.link(temp, state_dir / HOST_ID_FILE)
    except FileExistsError:
        return read_host_id(state_dir) or candidate
    except OSError:
        return candidate
    finally:
        temp.unlink(missing_ok=True)
    return candidate
