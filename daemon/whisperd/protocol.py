"""What the daemon and its worker process say to each other, as typed records.

The records travel pickled over a multiprocessing Pipe between two processes of the same
installation, so both sides always agree on them; a field added here is added for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from whisperd.options import DecodeOptions


class AttemptOutcome(StrEnum):
    """How one attempt at a job ended."""

    DONE = "done"
    ERROR = "error"  # the worker reported an error (permanent or not: see JobOutcome.permanent)
    CRASHED = "crashed"  # the worker process died, or could not start
    TIMEOUT = "timeout"  # the job ran past its deadline; the worker was killed
    INTERRUPTED = "interrupted"  # the daemon is stopping; the job goes back to the queue uncounted
    GONE = "gone"  # the recording was deleted or replaced during the job; no outputs were written


# -- daemon -> worker -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobRequest:
    job_id: int
    path: Path
    options: DecodeOptions
    outputs: tuple[str, ...]
    inbox_root: Path | None = None
    follow_links_outside: bool = False
    expected: tuple[int, int] | None = None  # (size, mtime_ns) the job was queued for


@dataclass(frozen=True, slots=True)
class Stop:
    """Finish nothing more and exit."""


# -- worker -> daemon -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    pid: int
    load_seconds: float
    engine: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Fatal:
    """The model could not load; the worker exits."""

    error: str
    traceback: str = ""


@dataclass(frozen=True, slots=True)
class JobProgress:
    """How far the running job is (sent about once a second, before its JobDone or JobFailed)."""

    job_id: int
    position_seconds: float
    duration_seconds: float


@dataclass(frozen=True, slots=True)
class JobDone:
    job_id: int
    pid: int
    jobs_done: int
    audio_seconds: float
    wall_seconds: float
    language: str
    language_probability: float | None
    segments: int
    outputs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class JobFailed:
    job_id: int
    pid: int
    jobs_done: int
    error: str
    permanent: bool
    gone: bool = False
    traceback: str = ""


# -- what the supervisor makes of one attempt -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobOutcome:
    kind: AttemptOutcome
    error: str = ""
    permanent: bool = False
    done: JobDone | None = None
