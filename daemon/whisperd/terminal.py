"""What `whisperd transcribe` shows while it works: a progress bar per file, and segments as they are decoded.

The bar goes to stderr, and only when stderr is a TTY (FORCE_COLOR, which CI systems set, does not
make a log file one; TTY_COMPATIBLE=0 turns the bar off on a TTY), so logs, pipes and CI output
never fill with escape codes. Segments (`--verbose`) and results go to stdout; while a bar is shown
on the same terminal, rich prints them above it instead of through it. Files may be transcribed
side by side (their windows in shared batches), so with several files each segment line starts
with its file's name.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, ProgressColumn, Task, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as Bars
from rich.text import Text

from whisperd.engine import Progress, ProgressCallback
from whisperd.status import shown
from whisperd.transcript import Segment


def timestamp(seconds: float) -> str:
    """`mm:ss.mmm` (`h:mm:ss.mmm` from an hour on), as whisper's own command line shows segments."""
    millis = round(max(0.0, seconds) * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    clock = f"{minutes:02d}:{millis // 1000:02d}.{millis % 1000:03d}"
    return f"{hours}:{clock}" if hours else clock


def segment_line(segment: Segment) -> str:
    """`[00:01.200 --> 00:04.800] text`: one line, whatever the text holds."""
    text = " ".join(segment.text.split())
    return f"[{timestamp(segment.start)} --> {timestamp(segment.end)}] {text}"


def _clock(seconds: float) -> str:
    """`m:ss` (`h:mm:ss` from an hour on): audio positions on the bar, where milliseconds would flicker."""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class TranscribeDisplay:
    """The bars of one `whisperd transcribe` run; `file(path)` gives the engine's progress callback."""

    def __init__(self, verbose: bool, console: Console | None = None, *, name_segments: bool = False) -> None:
        self.verbose = verbose
        self.name_segments = name_segments  # several files: their segments may come interleaved
        self._print_lock = threading.Lock()  # one whole line at a time, whichever file's thread prints
        if console is None and sys.stderr.isatty():
            console = Console(stderr=True)
        self._bars = _bars(console) if console is not None else None
        self._stderr = sys.stderr

    def __enter__(self) -> TranscribeDisplay:
        if self._bars is not None:
            self._bars.start()
            _move_log_handlers(self._stderr, sys.stderr)  # rich's stand-in, which prints above the bar
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._bars is not None:
            _move_log_handlers(sys.stderr, self._stderr)
            self._bars.stop()

    @contextmanager
    def file(self, path: Path) -> Iterator[ProgressCallback]:
        """A bar for `path` (shown until the run ends, frozen where the file stopped if it failed)."""
        bars = self._bars
        task = bars.add_task(shown(path.name), total=None) if bars is not None else None

        def update(progress: Progress) -> None:
            if bars is not None and task is not None:
                bars.update(task, total=progress.duration, completed=progress.position)
            if self.verbose:
                self._print_segments(path, progress.segments)

        try:
            yield update
        finally:
            if bars is not None and task is not None:
                bars.stop_task(task)


    def _print_segments(self, path: Path, segments: tuple[Segment, ...]) -> None:
        """`[00:01.200 --> 00:04.800] text` lines (`talk.wav: [...] text` with several files)."""
        prefix = f"{shown(path.name)}: " if self.name_segments else ""
        lines = "".join(f"{prefix}{segment_line(seg)}\n" for seg in segments if seg.text.strip())
        if lines:
            with self._print_lock:
                sys.stdout.write(lines)
                sys.stdout.flush()


def _bars(console: Console) -> Bars | None:
    """rich's progress display on `console`, or None when it is not a terminal."""
    if not console.is_terminal:
        return None
    return Bars(TextColumn("{task.description}", markup=False), BarColumn(), TaskProgressColumn(), _AudioPosition(), _Speed(),
                TimeRemainingColumn(elapsed_when_finished=True), console=console,
                redirect_stdout=sys.stdout.isatty(), transient=False)


def _move_log_handlers(old: object, new: object) -> None:
    """Point the log handlers that write to `old` at `new` (lines logged during a bar go above it)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is old:
            handler.setStream(new)


class _AudioPosition(ProgressColumn):
    """`3:20 / 10:00`: how far into the recording decoding has come."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("reading", style="progress.elapsed")
        return Text(f"{_clock(task.completed)} / {_clock(task.total)}", style="progress.download")


class _Speed(ProgressColumn):
    """`42.0x`: audio seconds per second of wall time since the file started (its real-time factor)."""

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        if not elapsed or not task.completed:
            return Text("", style="progress.data.speed")
        return Text(f"{task.completed / elapsed:.1f}x", style="progress.data.speed")
