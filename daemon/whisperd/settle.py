"""Deciding when a file in an inbox is complete: closed after writing, or unchanged for a while.

Split from whisperd.watcher (which turns filesystem events and scans into candidates) because this
is the part with its own clock and state machine, tested on its own with a fake clock and stat.
"""

from __future__ import annotations

import heapq
import itertools
import os
import stat as stat_mod
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import structlog

log = structlog.get_logger("whisperd.watcher")


class Activity(Enum):
    """What an event says about a candidate file."""

    SEEN = "seen"  # exists / appeared (created, renamed into place, found by a scan, attributes)
    WRITE = "write"  # data written: a writer has it open until we see CLOSED
    CLOSED = "closed"  # a writer closed it after writing (IN_CLOSE_WRITE)


Signature = tuple[int, int, int, int]  # (size, mtime_ns, inode, device)


def _signature(st: os.stat_result) -> Signature:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


@dataclass
class _Candidate:
    path: str
    stable_since: float  # last time anything about the file changed (event or stat)
    due: float  # when to stat it next
    sig: Signature | None = None
    open_for_write: bool = False
    generation: int = 0  # bumped on every change; detects events racing a stat


@dataclass
class SettleTracker:
    """Decides when candidate files are complete. Thread-safe; clock and stat are injectable.

    A candidate is *ready* when its stat signature (size, mtime_ns, inode, device) has not changed
    and no event touched it for ``settle_seconds`` - and, if a write was seen, a close-after-write
    came after it. If a writer keeps a file open but idle for ``open_idle_seconds`` (or the close
    event was lost: :meth:`events_lost` drops what we believed about open files), the file is
    released anyway, with a warning: better a transcript of what is there than a file stuck for
    ever; a later change makes a new job. An empty file must stay empty for
    ``empty_settle_seconds`` (a file being created is empty for a moment; one that stays empty
    is reported, so that it ends failed with a note instead of sitting in the inbox unexplained).
    A file gone before settling, or no longer a regular file, is dropped with a debug line.

    Stats happen only when a candidate is due (``poll``), not per event, so a burst of events or a
    huge start-up scan costs one or two stats per file.
    """

    settle_seconds: float = 2.0
    open_idle_seconds: float = 600.0
    empty_settle_seconds: float = 60.0
    clock: Callable[[], float] = time.monotonic
    stat: Callable[[str], os.stat_result] = os.stat
    remember: int = 100_000  # how many reported signatures to remember (LRU) to suppress repeats

    _candidates: dict[str, _Candidate] = field(default_factory=dict, init=False, repr=False)
    _heap: list[tuple[float, int, str]] = field(default_factory=list, init=False, repr=False)
    _seq: Iterator[int] = field(default_factory=itertools.count, init=False, repr=False)
    _reported: OrderedDict[str, Signature] = field(default_factory=OrderedDict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._candidates)

    def __contains__(self, path: object) -> bool:
        with self._lock:
            return isinstance(path, (str, os.PathLike)) and os.fspath(path) in self._candidates

    def observe(self, path: str | os.PathLike[str], activity: Activity = Activity.SEEN) -> None:
        """Record an event (or a scan sighting) for ``path``; restarts its settle window."""
        key = os.fspath(path)
        now = self.clock()
        with self._lock:
            cand = self._candidates.get(key)
            if cand is None:
                # Stat it promptly (due now) to take the first signature; the window runs from here.
                cand = _Candidate(path=key, stable_since=now, due=now)
                self._candidates[key] = cand
                self._push(cand)
            else:
                cand.stable_since = now
                cand.generation += 1
                if cand.sig is not None:
                    cand.due = now + self.settle_seconds
                    self._push(cand)
            if activity is Activity.WRITE:
                cand.open_for_write = True
            elif activity is Activity.CLOSED:
                cand.open_for_write = False

    def observe_scanned(self, path: str | os.PathLike[str], st: os.stat_result) -> bool:
        """A scan found ``path`` with stat ``st``. Returns False (and tracks nothing) when exactly
        this version was already reported, so periodic rescans of a big inbox stay cheap."""
        key = os.fspath(path)
        with self._lock:
            if key in self._candidates:
                return True  # already settling; the scan adds nothing (and must not reset it)
            if self._reported.get(key) == _signature(st):
                return False
        self.observe(key, Activity.SEEN)
        return True

    def forget(self, path: str | os.PathLike[str]) -> None:
        """The file was deleted or moved away: stop tracking it."""
        with self._lock:
            self._candidates.pop(os.fspath(path), None)

    def forget_under(self, directory: str | os.PathLike[str]) -> None:
        """A folder was deleted or moved away: stop tracking everything below it."""
        prefix = os.path.join(os.fspath(directory), "")
        with self._lock:
            for key in [k for k in self._candidates if k.startswith(prefix)]:
                del self._candidates[key]

    def events_lost(self) -> None:
        """The event stream dropped events (inotify overflow): a close may never come, so stop
        trusting the open-for-write flags and fall back to the settle window alone."""
        with self._lock:
            for cand in self._candidates.values():
                cand.open_for_write = False

    def next_due(self) -> float | None:
        """Clock time of the earliest pending check, ``None`` when nothing is tracked."""
        with self._lock:
            while self._heap:
                due, _, key = self._heap[0]
                cand = self._candidates.get(key)
                if cand is None or cand.due != due:
                    heapq.heappop(self._heap)  # stale entry
                    continue
                return due
            return None

    def poll(self) -> list[tuple[Path, os.stat_result]]:
        """Stat the candidates that are due; return (and stop tracking) those that are complete."""
        now = self.clock()
        due: dict[str, tuple[_Candidate, int]] = {}
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                when, _, key = heapq.heappop(self._heap)
                cand = self._candidates.get(key)
                if cand is not None and cand.due == when:  # else a stale entry
                    due[key] = (cand, cand.generation)
        ready: list[tuple[Path, os.stat_result]] = []
        for cand, generation in due.values():
            st = self._stat(cand.path)  # outside the lock: events keep flowing meanwhile
            with self._lock:
                if self._candidates.get(cand.path) is not cand:
                    continue  # forgotten meanwhile
                if st is None:
                    del self._candidates[cand.path]
                    continue
                now = self.clock()
                sig = _signature(st)
                if cand.generation != generation or sig != cand.sig:
                    if sig != cand.sig:
                        cand.sig = sig
                        cand.stable_since = now
                    cand.due = cand.stable_since + self.settle_seconds
                    self._push(cand)
                    continue
                quiet = now - cand.stable_since
                needed = self.empty_settle_seconds if st.st_size == 0 else self.settle_seconds
                if quiet < needed:
                    cand.due = cand.stable_since + needed
                    self._push(cand)
                    continue
                if cand.open_for_write and quiet < self.open_idle_seconds:
                    # Unchanged but still open: look again later (a close event also wakes us).
                    cand.due = now + self.settle_seconds
                    self._push(cand)
                    continue
                del self._candidates[cand.path]
                if cand.open_for_write:
                    log.warning(
                        "open file released", path=cand.path, idle_seconds=round(quiet, 1),
                        note="writer kept it open without writing; taking it as complete",
                    )
                if self._reported.get(cand.path) == sig:
                    log.debug("unchanged not reported again", path=cand.path)
                    continue
                ready.append((Path(cand.path), st))
        return ready

    def mark_reported(self, path: str | os.PathLike[str], st: os.stat_result) -> None:
        """Remember that this version of ``path`` was handed on (repeats of it are suppressed)."""
        key = os.fspath(path)
        with self._lock:
            self._reported[key] = _signature(st)
            self._reported.move_to_end(key)
            while len(self._reported) > self.remember:
                self._reported.popitem(last=False)

    def _push(self, cand: _Candidate) -> None:
        heapq.heappush(self._heap, (cand.due, next(self._seq), cand.path))

    def _stat(self, path: str) -> os.stat_result | None:
        try:
            st = self.stat(path)
        except FileNotFoundError:
            log.debug("vanished before settling", path=path)
            return None
        except OSError as exc:
            log.warning("stat failed", path=path, error=str(exc))
            return None
        if not stat_mod.S_ISREG(st.st_mode):
            log.debug("not a regular file", path=path)
            return None
        return st
