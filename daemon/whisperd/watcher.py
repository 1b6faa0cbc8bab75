"""Turn filesystem events in the inbox folders into *complete* files.

The problem (the most common complaint about peer tools): files picked up while still being copied,
queued several times, or missed when inotify's queue overflows or when the folder is a network
share that sends no events at all. The answer here has three layers:

1. Events only nominate *candidates*. ``watchdog`` delivers created / modified / closed-after-write /
   moved-into-place events (inotify; a ``PollingObserver`` for inboxes marked ``poll``). Names that
   are hidden, temporary, whisperd's own outputs or not audio/video are dropped at once
   (:func:`is_candidate_name`), so an rsync or browser temp name is never a candidate and the final
   name appears exactly once, when the copy is renamed into place.
2. :class:`SettleTracker` decides when a candidate is complete: its ``(size, mtime_ns, inode)``
   stayed unchanged for a settle window, and - where inotify tells us - the writer closed it
   (``IN_CLOSE_WRITE``) after its last write. Repeated events for one file collapse into one
   candidate; a file that vanishes before settling is dropped quietly.
3. A full scan at start-up and on a timer (and at once when inotify reports an overflow) feeds every
   eligible file back in as a candidate, so files that arrived while the daemon was down, or whose
   events were lost, are still found.

The watcher is *at least once*: a rescan may report a settled file again (after a restart it will).
Exactly once is the job store's work (a job is keyed by path, size and mtime). Within one process
the watcher remembers what it already reported and does not report an unchanged file twice.

Over 500 lines as one idea: events and scans turned into complete-file reports (the settle
state machine itself is whisperd.settle).
"""

from __future__ import annotations

import functools
import logging
import os
import stat as stat_mod
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from whisperd.naming import SIDE_FILE_SUFFIXES, TEMP_MARKER, TEMPORARY_SUFFIXES
from whisperd.settle import Activity, SettleTracker

__all__ = [
    "AUDIO_EXTENSIONS",
    "IGNORED_SUFFIXES",
    "Activity",
    "Inbox",
    "SettleTracker",
    "Watcher",
    "is_candidate_name",
    "scan_inbox",
    "unrecognised_reason",
]

log = structlog.get_logger(__name__)

#: File extensions (lower case, no dot) that can hold a recording whisperd will decode.
AUDIO_EXTENSIONS: Final[frozenset[str]] = frozenset(
    {
        "wav", "flac", "mp3", "ogg", "oga", "opus", "m4a", "aac", "mp4", "mkv", "webm", "wma",
        "aif", "aiff", "amr", "3gp", "mov",
    }
)

#: Name endings that mark a temporary or side file, never a recording (checked case-insensitively).
#: Most of them also fail the extension test; they are listed so the rule is explicit and holds
#: even if someone adds an extension to ``AUDIO_EXTENSIONS``.
IGNORED_SUFFIXES: Final[tuple[str, ...]] = TEMPORARY_SUFFIXES + SIDE_FILE_SUFFIXES

#: Substring of the temporary names whisperd writes before renaming an output into place.
WHISPERD_TMP_MARKER: Final = TEMP_MARKER

# Only the events that can change whether a file is complete; in particular no IN_OPEN or
# IN_CLOSE_NOWRITE, which the worker's own reads of the audio would otherwise flood us with.
_EVENT_FILTER: Final[list[type[FileSystemEvent]]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
]


def is_candidate_name(path: str | os.PathLike[str]) -> bool:
    """Whether a file *name* may be a recording to transcribe (pure: looks only at the last part).

    False for hidden names (``.*``: rsync's ``.talk.wav.XXXXXX``, editors' swap files), temporary
    and partial downloads (``*.part``, ``*.tmp``, ``*.crdownload``, ``*~``, ...), whisperd's outputs
    and side files (``*.txt``, ``*.srt``, ``*.vtt``, ``*.json``, ``*.whisperd-tmp*``), and anything
    whose extension is not in :data:`AUDIO_EXTENSIONS`.
    """
    name = os.path.basename(os.fspath(path))
    if not name or name.startswith("."):
        return False
    lower = name.lower()
    if WHISPERD_TMP_MARKER in lower or lower.endswith(IGNORED_SUFFIXES):
        return False
    stem, dot, ext = lower.rpartition(".")
    return bool(dot and stem and ext in AUDIO_EXTENSIONS)


def unrecognised_reason(name: str) -> str | None:
    """Why a visible, non-temporary file is not taken as a recording (None when that is expected).

    A recording saved without an extension, or with one whisperd does not know, would otherwise
    sit in the inbox with no job and no word; the daemon logs and shows these names once.
    """
    if not name or name.startswith(".") or is_candidate_name(name):
        return None
    lower = name.lower()
    if WHISPERD_TMP_MARKER in lower or lower.endswith(IGNORED_SUFFIXES):
        return None
    stem, dot, ext = lower.rpartition(".")
    if not dot or not stem:
        return "no file extension, so it is not taken as a recording (add one such as .m4a or .wav)"
    return f"extension .{ext} is not a known audio or video type"


@dataclass(frozen=True)
class Inbox:
    """A folder to watch. ``poll`` for network shares (NFS/SMB deliver no inotify events)."""

    path: Path
    recursive: bool = True
    poll: bool = False

    def __post_init__(self) -> None:
        # Absolute but not symlink-resolved: events, scans and job-store keys all use this prefix.
        object.__setattr__(self, "path", Path(os.path.abspath(os.path.expanduser(os.fspath(self.path)))))

    def owns(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` is a file this inbox is responsible for: inside it (directly, unless
        recursive), with an eligible name and no hidden folder on the way (``.git``, ``.Trash-1000``)."""
        try:
            rel = Path(path).relative_to(self.path)
        except ValueError:
            return False
        parts = rel.parts
        if not parts or not is_candidate_name(parts[-1]):
            return False
        if not self.recursive and len(parts) != 1:
            return False
        return not any(p.startswith(".") for p in parts[:-1])


# --------------------------------------------------------------------------------------------------
# Scanning


def scan_inbox(
    inbox: Inbox,
    *,
    scandir: Callable[[str], Iterable[os.DirEntry[str]]] = os.scandir,
    on_unrecognised: Callable[[str, str], None] | None = None,
) -> Iterator[tuple[str, os.stat_result]]:
    """Yield ``(path, stat)`` for every eligible regular file in ``inbox``.

    Hidden folders are not entered, symlinked folders are not followed (no loops), and a folder or
    file that cannot be read is logged and skipped - one bad subfolder must not hide the others.
    """
    stack = [os.fspath(inbox.path)]
    while stack:
        directory = stack.pop()
        try:
            with _as_context(scandir(directory)) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if inbox.recursive and not entry.name.startswith("."):
                                stack.append(entry.path)
                            continue
                        if not is_candidate_name(entry.name):
                            reason = unrecognised_reason(entry.name) if on_unrecognised else None
                            if reason and on_unrecognised and entry.is_file(follow_symlinks=False):
                                on_unrecognised(entry.path, reason)
                            continue
                        st = entry.stat()  # follows a symlink to a file
                    except OSError as exc:
                        if not isinstance(exc, FileNotFoundError):
                            log.warning("scan entry unreadable", path=entry.path, error=str(exc))
                        continue
                    if stat_mod.S_ISREG(st.st_mode):
                        yield entry.path, st
        except OSError as exc:
            if directory == os.fspath(inbox.path):
                log.error("inbox unreadable", inbox=directory, error=str(exc))
            else:
                log.warning("folder unreadable skipped", folder=directory, error=str(exc))


class _as_context:
    """``os.scandir`` results are context managers; injected test doubles may be plain iterables."""

    def __init__(self, it: Iterable[os.DirEntry[str]]) -> None:
        self._it = it

    def __enter__(self) -> Iterable[os.DirEntry[str]]:
        return self._it

    def __exit__(self, *exc: object) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


# --------------------------------------------------------------------------------------------------
# Events


class _InboxHandler(FileSystemEventHandler):
    """Maps one inbox's watchdog events onto the tracker (runs on the observer's thread; cheap)."""

    def __init__(self, watcher: Watcher, inbox: Inbox, *, has_close_events: bool) -> None:
        self._watcher = watcher
        self._inbox = inbox
        # A PollingObserver reports "modified" from stat diffs and never reports a close, so a
        # modification must not mark the file as open there (it would wait for a close for ever).
        self._write = Activity.WRITE if has_close_events else Activity.SEEN

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._handle(event)
        except Exception:  # never let one odd event kill the observer thread
            log.exception("event handling failed", event=repr(event))

    def _handle(self, event: FileSystemEvent) -> None:
        tracker = self._watcher.tracker
        src = os.fsdecode(event.src_path)
        dest = os.fsdecode(event.dest_path) if event.dest_path else ""
        if event.is_directory:
            if isinstance(event, (DirDeletedEvent, DirMovedEvent)):
                tracker.forget_under(src)
            # DirCreated: watchdog walks new (or moved-in) folders and reports their files itself.
            return
        if isinstance(event, FileMovedEvent):
            tracker.forget(src)
            if dest and self._inbox.owns(dest):
                self._watcher._nominate(dest, Activity.SEEN)
            elif dest:
                self._watcher._unrecognised(self._inbox, dest)
            return
        if isinstance(event, FileDeletedEvent):
            tracker.forget(src)
            return
        if not self._inbox.owns(src):
            if isinstance(event, FileClosedEvent):
                self._watcher._unrecognised(self._inbox, src)
            return
        if isinstance(event, FileClosedEvent):
            self._watcher._nominate(src, Activity.CLOSED)
        elif isinstance(event, FileModifiedEvent):
            self._watcher._nominate(src, self._write)
        else:  # created, attributes changed
            self._watcher._nominate(src, Activity.SEEN)


class _OverflowHook(logging.Handler):
    """watchdog 7 handles an inotify queue overflow internally and only *logs* it; this handler on
    its logger turns that line into an immediate rescan, so lost events cost seconds, not a
    rescan interval. (If the message ever changes, the periodic rescan still covers it.)"""

    LOGGERS: Final = ("watchdog.observers.inotify_c",)

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(level=logging.WARNING)
        self._on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if "overflow" in record.getMessage().lower():
                self._on_overflow()
        except Exception:  # a logging handler must never raise
            pass

    def install(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)

    def uninstall(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)


# --------------------------------------------------------------------------------------------------
# The watcher


class Watcher:
    """Watches inboxes and calls ``on_ready(path, stat)`` once per complete file.

    Threads: watchdog's observer threads (inotify, and polling when an inbox needs it) feed the
    :class:`SettleTracker`; a *settle* thread stats due candidates and calls ``on_ready``; a *scan*
    thread runs the start-up and periodic full scans. ``on_ready`` runs on the settle thread and
    should be quick (enqueue and return); if it raises, the error is logged and the file is
    offered again by the next scan.

    An inbox that does not exist or cannot be watched when the watcher starts (a share not yet
    mounted), or whose folder is deleted later, is logged and retried at every scan, instead of
    failing the daemon.

    ``settle_seconds``: how long a file must stay unchanged; ``rescan_seconds``: period of the full
    scan; ``poll_seconds``: polling period of ``poll`` inboxes; ``open_idle_seconds``: how long a
    file still open for writing but unchanged is held back before it is taken anyway.
    """

    def __init__(
        self,
        inboxes: Iterable[Inbox],
        on_ready: Callable[[Path, os.stat_result], None],
        settle_seconds: float = 2.0,
        rescan_seconds: float = 300.0,
        *,
        on_unrecognised: Callable[[str, str], None] | None = None,
        poll_seconds: float = 2.0,
        open_idle_seconds: float = 600.0,
        empty_settle_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inboxes: tuple[Inbox, ...] = _unique(inboxes)
        self._on_ready = on_ready
        self._on_unrecognised = on_unrecognised
        self.settle_seconds = settle_seconds
        self.rescan_seconds = rescan_seconds
        self.poll_seconds = poll_seconds
        self._clock = clock
        self.tracker = SettleTracker(settle_seconds=settle_seconds, open_idle_seconds=open_idle_seconds,
                                     empty_settle_seconds=max(settle_seconds, empty_settle_seconds), clock=clock)

        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake_settle = threading.Event()
        self._scan_cond = threading.Condition()
        self._scan_requested = 0
        self._scan_completed = 0
        self._observers: dict[bool, BaseObserver] = {}  # keyed by Inbox.poll
        self._watches: dict[Inbox, ObservedWatch] = {}
        self._threads: list[threading.Thread] = []
        self._overflow_hook = _OverflowHook(self._on_events_lost)
        self.events_lost = 0  # inotify overflows so far
        self._started = False

    # -- public API ------------------------------------------------------------------------------

    @property
    def inboxes(self) -> tuple[Inbox, ...]:
        return self._inboxes

    @property
    def watching(self) -> tuple[Inbox, ...]:
        """The inboxes that currently have a live watch (the others wait for the next scan)."""
        with self._lock:
            return tuple(self._watches)

    def start(self) -> None:
        """Start observing, then scan everything once (observers first, so nothing slips between)."""
        with self._lock:
            if self._started:
                return
            self._started = True
            self._stop.clear()
            self._overflow_hook.install()
            self._sync_watches()
            self._threads = [
                threading.Thread(target=self._settle_loop, name="whisperd-settle", daemon=True),
                threading.Thread(target=self._scan_loop, name="whisperd-scan", daemon=True),
            ]
            for t in self._threads:
                t.start()
        self.rescan_now()
        log.info(
            "watcher started",
            inboxes=[str(i.path) for i in self._inboxes],
            settle_seconds=self.settle_seconds,
            rescan_seconds=self.rescan_seconds,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop observers and threads. Candidates still settling are dropped (the next start-up
        scan finds them again)."""
        with self._lock:
            if not self._started:
                return
            self._started = False
            self._stop.set()
            self._wake_settle.set()
            with self._scan_cond:
                self._scan_cond.notify_all()
            observers = list(self._observers.values())
            self._observers.clear()
            self._watches.clear()
            threads, self._threads = self._threads, []
            self._overflow_hook.uninstall()
        for obs in observers:
            obs.stop()
        for obs in observers:
            obs.join(timeout)
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout)
        log.info("watcher stopped")

    def __enter__(self) -> Watcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def rescan_now(self, *, wait: bool = False, timeout: float | None = None) -> bool:
        """Ask for a full scan now. With ``wait``, block until a scan that started after this call
        has finished; returns False on timeout (or if the watcher stops)."""
        with self._scan_cond:
            self._scan_requested += 1
            ticket = self._scan_requested
            self._scan_cond.notify_all()
            if not wait:
                return True
            if not self._started:
                return False  # no scan thread to wait for; start() scans anyway
            return self._scan_cond.wait_for(
                lambda: self._scan_completed >= ticket or self._stop.is_set(), timeout
            ) and self._scan_completed >= ticket

    def update_inboxes(self, inboxes: Iterable[Inbox]) -> None:
        """Replace the inbox list (SIGHUP reload): unwatch removed ones, watch new ones, rescan."""
        new = _unique(inboxes)
        with self._lock:
            removed = set(self._inboxes) - set(new)
            self._inboxes = new
            if self._started:
                self._sync_watches()
            for inbox in removed:
                self.tracker.forget_under(inbox.path)
        log.info("inboxes updated", inboxes=[str(i.path) for i in new])
        if self._started:
            self.rescan_now()

    @property
    def pending(self) -> int:
        """Candidates still settling."""
        return len(self.tracker)

    # -- internals -------------------------------------------------------------------------------

    def _nominate(self, path: str, activity: Activity) -> None:
        self.tracker.observe(path, activity)
        self._wake_settle.set()

    def _unrecognised(self, inbox: Inbox, path: str) -> None:
        if self._on_unrecognised is None:
            return
        try:
            parts = Path(path).relative_to(inbox.path).parts
        except ValueError:
            return
        if not parts or any(p.startswith(".") for p in parts[:-1]) or (not inbox.recursive and len(parts) != 1):
            return
        reason = unrecognised_reason(parts[-1])
        if reason:
            try:
                self._on_unrecognised(path, reason)
            except Exception:  # never let the report break event handling
                log.exception("unrecognised report failed", path=path)

    def _on_events_lost(self) -> None:
        self.events_lost += 1  # read by the metrics
        log.warning("events lost", action="rescanning now")
        self.tracker.events_lost()
        self.rescan_now()

    def _observer(self, poll: bool) -> BaseObserver:
        obs = self._observers.get(poll)
        if obs is None:
            obs = PollingObserver(timeout=self.poll_seconds) if poll else Observer()
            obs.daemon = True
            obs.start()
            self._observers[poll] = obs
        return obs

    def _sync_watches(self) -> None:
        """Make the live watches match ``self._inboxes``; failures are logged and retried later."""
        with self._lock:
            if not self._started:
                return
            # A watch whose emitter stopped (its folder was deleted) is dropped, to be redone below.
            for inbox, watch in list(self._watches.items()):
                emitter = next((e for e in self._observers[inbox.poll].emitters if e.watch == watch), None)
                if emitter is not None and not emitter.is_alive():
                    log.warning("watch lost", inbox=str(inbox.path))
                    self._unschedule(inbox)
            for inbox in list(self._watches):
                if inbox not in self._inboxes:
                    self._unschedule(inbox)
            for inbox in self._inboxes:
                if inbox in self._watches:
                    continue
                if not inbox.path.is_dir():
                    log.error("inbox missing", inbox=str(inbox.path), retry="at next scan")
                    continue
                handler = _InboxHandler(self, inbox, has_close_events=not inbox.poll)
                try:
                    watch = self._observer(inbox.poll).schedule(
                        handler, os.fspath(inbox.path), recursive=inbox.recursive, event_filter=_EVENT_FILTER
                    )
                except OSError as exc:
                    log.error("watch failed", inbox=str(inbox.path), error=str(exc), retry="at next scan")
                    continue
                self._watches[inbox] = watch
                log.debug("watching", inbox=str(inbox.path), recursive=inbox.recursive, poll=inbox.poll)

    def _unschedule(self, inbox: Inbox) -> None:
        watch = self._watches.pop(inbox)
        try:
            self._observers[inbox.poll].unschedule(watch)
        except Exception as exc:  # already gone (folder deleted)
            log.debug("unschedule failed", inbox=str(inbox.path), error=str(exc))

    def _settle_loop(self) -> None:
        while not self._stop.is_set():
            due = self.tracker.next_due()
            wait = 1.0 if due is None else min(1.0, max(0.0, due - self._clock()))
            if wait > 0:
                self._wake_settle.wait(wait)
            self._wake_settle.clear()
            if self._stop.is_set():
                break
            try:
                ready = self.tracker.poll()
            except Exception:
                log.exception("settle failed")
                continue
            for path, st in ready:
                if self._stop.is_set():
                    break
                try:
                    self._on_ready(path, st)
                except Exception:
                    log.exception("on ready failed", path=str(path), retry="at next scan")
                else:
                    self.tracker.mark_reported(path, st)

    def _scan_due(self, next_periodic: float) -> bool:
        """Whether the scan thread should wake: stopping, a scan asked for, or the periodic one due."""
        return self._stop.is_set() or self._scan_requested > self._scan_completed or self._clock() >= next_periodic

    def _scan_loop(self) -> None:
        next_periodic = self._clock() + self.rescan_seconds
        while not self._stop.is_set():
            with self._scan_cond:
                self._scan_cond.wait_for(
                    functools.partial(self._scan_due, next_periodic),
                    timeout=max(0.0, min(5.0, next_periodic - self._clock())),
                )
                if self._stop.is_set():
                    break
                if self._scan_requested <= self._scan_completed and self._clock() < next_periodic:
                    continue
                ticket = self._scan_requested
            try:
                self._scan_all()
            except Exception:
                log.exception("scan failed")
            next_periodic = self._clock() + self.rescan_seconds
            with self._scan_cond:
                self._scan_completed = max(self._scan_completed, ticket)
                self._scan_cond.notify_all()

    def _scan_all(self) -> None:
        started = self._clock()
        self._sync_watches()  # retry inboxes that were missing or failed
        seen = nominated = 0
        for inbox in self._inboxes:
            if self._stop.is_set():
                return
            if not inbox.path.is_dir():
                continue  # logged by _sync_watches; retried at the next scan
            for path, st in scan_inbox(inbox, on_unrecognised=self._on_unrecognised):
                seen += 1
                if self.tracker.observe_scanned(path, st):
                    nominated += 1
                    self._wake_settle.set()
        log.info(
            "inbox scan done", files=seen, candidates=nominated,
            seconds=round(self._clock() - started, 3),
        )


def _unique(inboxes: Iterable[Inbox]) -> tuple[Inbox, ...]:
    return tuple(dict.fromkeys(inboxes))
