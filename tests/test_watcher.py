"""Tests for the inbox watcher: name rules, the settle logic (fake clock) and real observers on a
real filesystem (inotify and polling)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from whisperd.watcher import (
    AUDIO_EXTENSIONS,
    Activity,
    Inbox,
    SettleTracker,
    Watcher,
    is_candidate_name,
    scan_inbox,
)

pytestmark = pytest.mark.timeout(30)

SETTLE = 0.5  # short settle window for the real-filesystem tests


# -- helpers ----------------------------------------------------------------------------------


class Collector:
    """An ``on_ready`` callback that records what it is given."""

    def __init__(self) -> None:
        self.calls: list[tuple[Path, int, float]] = []
        self._cond = threading.Condition()

    def __call__(self, path: Path, st: os.stat_result) -> None:
        with self._cond:
            self.calls.append((path, st.st_size, time.monotonic()))
            self._cond.notify_all()

    @property
    def paths(self) -> list[Path]:
        with self._cond:
            return [p for p, _, _ in self.calls]

    def wait_for(self, predicate: Callable[[list[Path]], bool], timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate([p for p, _, _ in self.calls]), timeout)

    def wait_count(self, n: int, timeout: float = 10.0) -> bool:
        return self.wait_for(lambda paths: len(paths) >= n, timeout)


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    d = tmp_path / "inbox"
    d.mkdir()
    return d


@pytest.fixture
def make_watcher() -> Iterator[Callable[..., Watcher]]:
    started: list[Watcher] = []

    def make(inboxes: list[Inbox], on_ready: Callable[[Path, os.stat_result], None], **kw: object) -> Watcher:
        kw.setdefault("settle_seconds", SETTLE)
        w = Watcher(inboxes, on_ready, **kw)  # type: ignore[arg-type]
        w.start()
        assert w.rescan_now(wait=True, timeout=10)  # start-up scan done: watches are live
        started.append(w)
        return w

    yield make
    for w in started:
        w.stop()


def write_file(path: Path, size: int = 4096) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x01" * size)
    return path


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["talk.wav", "TALK.WAV", "a.b.flac", "x.mp3", "clip.mp4", "v.webm", "m.m4a", "r.3gp", "o.opus", "z.aiff"],
)
def test_audio_names_are_candidates(name: str) -> None:
    assert is_candidate_name(name)
    assert is_candidate_name(Path("/some/dir") / name)


@pytest.mark.parametrize(
    "name",
    [
        ".talk.wav", ".talk.wav.Ab12Cd",  # hidden, rsync temp
        "talk.wav.part", "talk.wav.tmp", "talk.wav.crdownload", "talk.wav~", "talk.wav.partial",
        "talk.wav.swp", ".talk.wav.swp",
        "talk.txt", "talk.srt", "talk.vtt", "talk.json", "talk.error.txt",  # whisperd outputs
        "talk.whisperd-tmp.wav", "talk.txt.whisperd-tmp", "talk.WHISPERD-TMP.mp3",
        "notes.pdf", "README", "wav", ".wav", "talk.", "",
    ],
)
def test_ignored_names(name: str) -> None:
    assert not is_candidate_name(name)


def test_extension_set_is_the_documented_one() -> None:
    assert AUDIO_EXTENSIONS == set(
        "wav flac mp3 ogg oga opus m4a aac mp4 mkv webm wma aif aiff amr 3gp mov".split()
    )


def test_inbox_owns_respects_recursion_and_hidden_folders(tmp_path: Path) -> None:
    rec = Inbox(tmp_path)
    flat = Inbox(tmp_path, recursive=False)
    assert rec.owns(tmp_path / "a.wav") and flat.owns(tmp_path / "a.wav")
    assert rec.owns(tmp_path / "sub" / "a.wav") and not flat.owns(tmp_path / "sub" / "a.wav")
    assert not rec.owns(tmp_path / ".git" / "a.wav")
    assert not rec.owns(tmp_path / "a.txt")
    assert not rec.owns(tmp_path.parent / "a.wav")
    assert Inbox(Path("rel")).path.is_absolute()


# -- SettleTracker with a fake clock ------------------------------------------------------------


class FakeFS:
    """A clock and a ``stat`` over a dict of path -> (size, mtime_ns)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.files: dict[str, tuple[int, int]] = {}
        self.stats = 0

    def clock(self) -> float:
        return self.now

    def stat(self, path: str) -> os.stat_result:
        self.stats += 1
        if path not in self.files:
            raise FileNotFoundError(path)
        size, mtime_ns = self.files[path]
        # mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime + ns fields via tuple form
        return os.stat_result((0o100644, 7, 1, 1, 0, 0, size, 0, mtime_ns // 10**9, 0,
                               0, mtime_ns / 1e9, 0, 0, 0, mtime_ns, 0))

    def write(self, path: str, size: int) -> None:
        self.files[path] = (size, int(self.now * 1e9))


@pytest.fixture
def fs() -> FakeFS:
    return FakeFS()


def tracker_for(fs: FakeFS, **kw: float) -> SettleTracker:
    return SettleTracker(settle_seconds=kw.pop("settle", 2.0), clock=fs.clock, stat=fs.stat, **kw)  # type: ignore[arg-type]


def advance(fs: FakeFS, tracker: SettleTracker, seconds: float, step: float = 0.25) -> list[str]:
    """Move the clock forward in steps, polling like the settle thread; return what became ready."""
    ready: list[str] = []
    end = fs.now + seconds
    while fs.now < end - 1e-9:
        fs.now = min(end, fs.now + step)
        ready += [str(p) for p, _ in tracker.poll()]
    return ready


def test_tracker_ready_after_settle_window(fs: FakeFS) -> None:
    t = tracker_for(fs)
    fs.write("/i/a.wav", 100)
    t.observe("/i/a.wav")
    assert t.next_due() == fs.now  # first stat right away
    assert t.poll() == []
    assert t.next_due() == fs.now + 2.0
    assert advance(fs, t, 1.75) == []
    ready = t.poll()
    assert ready == []
    fs.now += 0.25
    ready = t.poll()
    assert [(str(p), st.st_size) for p, st in ready] == [("/i/a.wav", 100)]
    assert len(t) == 0 and t.next_due() is None


def test_tracker_growing_file_waits_for_last_chunk(fs: FakeFS) -> None:
    t = tracker_for(fs)
    fs.write("/i/a.wav", 0)
    t.observe("/i/a.wav")
    for size in range(1, 11):  # a chunk every 1.5 s (shorter than the window), no events at all
        assert advance(fs, t, 1.5) == []
        fs.write("/i/a.wav", size * 1000)
    assert advance(fs, t, 1.9) == []  # never before a full window after the last change
    # Without events a change is only seen at the next stat, and the window counts from there:
    # at worst two windows after the last write.
    assert advance(fs, t, 2.25) == ["/i/a.wav"]


def test_tracker_events_restart_the_window(fs: FakeFS) -> None:
    t = tracker_for(fs)
    fs.write("/i/a.wav", 10)
    t.observe("/i/a.wav")
    for _ in range(5):
        assert advance(fs, t, 1.5) == []
        t.observe("/i/a.wav")  # e.g. attributes changed; stat looks the same
    assert advance(fs, t, 2.0) == ["/i/a.wav"]


def test_tracker_open_file_waits_for_close(fs: FakeFS) -> None:
    t = tracker_for(fs, open_idle_seconds=60.0)
    fs.write("/i/a.wav", 10)
    t.observe("/i/a.wav", Activity.SEEN)
    t.observe("/i/a.wav", Activity.WRITE)
    assert advance(fs, t, 30.0) == []  # unchanged for 30 s but the writer still has it open
    t.observe("/i/a.wav", Activity.CLOSED)
    assert advance(fs, t, 1.9) == []  # the window restarts at the close
    assert advance(fs, t, 0.2) == ["/i/a.wav"]


def test_tracker_releases_open_but_idle_file_eventually(fs: FakeFS) -> None:
    t = tracker_for(fs, open_idle_seconds=20.0)
    fs.write("/i/a.wav", 10)
    t.observe("/i/a.wav", Activity.WRITE)
    assert advance(fs, t, 19.0) == []
    assert advance(fs, t, 3.0) == ["/i/a.wav"]


def test_tracker_events_lost_drops_open_flags(fs: FakeFS) -> None:
    t = tracker_for(fs)
    fs.write("/i/a.wav", 10)
    t.observe("/i/a.wav", Activity.WRITE)
    assert advance(fs, t, 5.0) == []
    t.events_lost()  # the close may have been among the lost events
    assert advance(fs, t, 2.5) == ["/i/a.wav"]


def test_tracker_drops_vanished_files(fs: FakeFS) -> None:
    t = tracker_for(fs)
    fs.write("/i/gone.wav", 10)
    t.observe("/i/gone.wav")
    t.observe("/i/never.wav")  # already gone when first stat'ed
    assert advance(fs, t, 1.0) == []
    del fs.files["/i/gone.wav"]
    assert advance(fs, t, 5.0) == []
    assert len(t) == 0


def test_tracker_reports_a_file_that_stays_empty_only_after_the_empty_window(fs: FakeFS) -> None:
    """A file being created is empty for a moment; one that stays empty is reported (and fails with
    a note), so it does not sit in the inbox unexplained."""
    t = tracker_for(fs)
    t.empty_settle_seconds = 30.0
    fs.write("/i/empty.wav", 0)
    fs.write("/i/growing.wav", 0)
    t.observe("/i/empty.wav")
    t.observe("/i/growing.wav")
    assert advance(fs, t, 5.0) == []
    fs.write("/i/growing.wav", 100)  # its first write arrives: a normal settle from here
    t.observe("/i/growing.wav", Activity.CLOSED)
    assert advance(fs, t, 5.0) == ["/i/growing.wav"]
    assert advance(fs, t, 15.0) == []
    assert advance(fs, t, 10.0) == ["/i/empty.wav"]
    assert len(t) == 0


def test_tracker_forget_and_forget_under(fs: FakeFS) -> None:
    t = tracker_for(fs)
    for p in ("/i/a.wav", "/i/sub/b.wav", "/i/sub/deeper/c.wav", "/i/subway.wav"):
        fs.write(p, 10)
        t.observe(p)
    t.forget("/i/a.wav")
    t.forget_under("/i/sub")
    assert advance(fs, t, 3.0) == ["/i/subway.wav"]


def test_tracker_collapses_repeated_events_and_stats_sparingly(fs: FakeFS) -> None:
    t = tracker_for(fs)
    fs.write("/i/a.wav", 10)
    for _ in range(1000):
        t.observe("/i/a.wav", Activity.SEEN)
    assert len(t) == 1
    assert advance(fs, t, 3.0) == ["/i/a.wav"]
    assert fs.stats == 2  # one to take the signature, one to confirm it


def test_tracker_does_not_report_the_same_version_twice(fs: FakeFS) -> None:
    t = tracker_for(fs)
    fs.write("/i/a.wav", 10)
    t.observe("/i/a.wav")
    [(path, st)] = _poll_until_ready(fs, t)
    t.mark_reported(path, st)
    assert not t.observe_scanned("/i/a.wav", fs.stat("/i/a.wav"))  # rescan: same version, skipped
    t.observe("/i/a.wav", Activity.CLOSED)  # a stray event without a change
    assert advance(fs, t, 3.0) == []  # settles, but is not reported again
    fs.write("/i/a.wav", 20)  # replaced: a new version
    assert t.observe_scanned("/i/a.wav", fs.stat("/i/a.wav"))
    assert advance(fs, t, 3.0) == ["/i/a.wav"]


def _poll_until_ready(fs: FakeFS, t: SettleTracker) -> list[tuple[Path, os.stat_result]]:
    for _ in range(100):
        fs.now += 0.25
        ready = t.poll()
        if ready:
            return ready
    raise AssertionError("never ready")


def test_tracker_handles_replacement_by_rename(fs: FakeFS) -> None:
    """Same size and mtime but another inode (a copy renamed over the file) restarts the window."""
    t = tracker_for(fs)
    fs.write("/i/a.wav", 10)
    t.observe("/i/a.wav")
    advance(fs, t, 1.0)
    real_stat = fs.stat

    def other_inode(path: str) -> os.stat_result:
        st = real_stat(path)
        return os.stat_result((st.st_mode, 8, *tuple(st)[2:10], st.st_atime, st.st_mtime, st.st_ctime,
                               st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns))

    t.stat = other_inode
    assert advance(fs, t, 1.5) == []  # the next due stat (2.25 s in) sees the new inode...
    assert advance(fs, t, 1.5) == []  # ...and the window restarts from there
    assert advance(fs, t, 0.5) == ["/i/a.wav"]


# -- scanning ---------------------------------------------------------------------------------


def test_scan_skips_hidden_folders_and_respects_recursion(inbox: Path) -> None:
    write_file(inbox / "a.wav")
    write_file(inbox / "sub" / "b.mp3")
    write_file(inbox / ".git" / "c.wav")
    write_file(inbox / "sub" / "notes.txt")
    (inbox / "link").symlink_to(inbox, target_is_directory=True)  # a loop must not be followed
    found = sorted(os.path.relpath(p, inbox) for p, _ in scan_inbox(Inbox(inbox)))
    assert found == ["a.wav", os.path.join("sub", "b.mp3")]
    flat = sorted(os.path.relpath(p, inbox) for p, _ in scan_inbox(Inbox(inbox, recursive=False)))
    assert flat == ["a.wav"]


def test_scan_skips_an_unreadable_folder_and_logs_it(inbox: Path) -> None:
    """Injected failure: works whoever runs the tests (root reads chmod-000 folders)."""
    write_file(inbox / "a.wav")
    write_file(inbox / "locked" / "hidden-from-us.wav")
    write_file(inbox / "zz" / "b.wav")
    locked = os.fspath(inbox / "locked")

    def scandir(path: str):  # noqa: ANN202
        if path == locked:
            raise PermissionError(13, "Permission denied", path)
        return os.scandir(path)

    with structlog.testing.capture_logs() as logs:
        found = sorted(os.path.relpath(p, inbox) for p, _ in scan_inbox(Inbox(inbox), scandir=scandir))
    assert found == ["a.wav", os.path.join("zz", "b.wav")]
    assert any(e["event"] == "folder unreadable skipped" and e["folder"] == locked for e in logs)


# -- real observers ---------------------------------------------------------------------------


def test_file_written_in_chunks_is_emitted_once_complete(inbox: Path, make_watcher) -> None:
    """A writer holding the file open and writing a chunk every 0.3 s for ~3 s, settle window 1 s."""
    got = Collector()
    make_watcher([Inbox(inbox)], got, settle_seconds=1.0)
    target = inbox / "meeting.wav"
    chunk, chunks = b"\x02" * 65536, 10
    with open(target, "wb") as f:
        for _ in range(chunks):
            f.write(chunk)
            f.flush()
            time.sleep(0.3)
            assert got.paths == [], "emitted while still being written"
    closed_at = time.monotonic()
    assert got.wait_count(1, timeout=5)
    time.sleep(1.0)  # and nothing more
    assert [(p, size) for p, size, _ in got.calls] == [(target, len(chunk) * chunks)]
    assert got.calls[0][2] - closed_at >= 0.9  # a full settle window after the last write


def test_appending_writer_that_reopens_per_chunk(inbox: Path, make_watcher) -> None:
    """open-append-close per chunk (each close is a close-after-write): the window still holds."""
    got = Collector()
    make_watcher([Inbox(inbox)], got, settle_seconds=1.0)
    target = inbox / "stream.flac"
    for _ in range(6):
        with open(target, "ab") as f:
            f.write(b"\x03" * 10000)
        time.sleep(0.35)
        assert got.paths == []
    assert got.wait_count(1, timeout=5)
    time.sleep(1.0)
    assert [(p, size) for p, size, _ in got.calls] == [(target, 60000)]


def test_open_file_idle_longer_than_settle_waits_for_close(inbox: Path, make_watcher) -> None:
    """inotify tells us the writer still has it open: a pause longer than the window is not the end."""
    got = Collector()
    make_watcher([Inbox(inbox)], got, settle_seconds=0.3)
    target = inbox / "slow.wav"
    with open(target, "wb") as f:
        f.write(b"\x04" * 1000)
        f.flush()
        time.sleep(1.5)  # 5 settle windows without a write
        assert got.paths == [], "emitted while the writer still had it open"
        f.write(b"\x04" * 1000)
    assert got.wait_count(1, timeout=5)
    assert [(p, size) for p, size, _ in got.calls] == [(target, 2000)]


def test_temp_name_then_rename_is_emitted_once_under_final_name(inbox: Path, make_watcher) -> None:
    """rsync (``.talk.wav.Ab12Cd``), Firefox (``.part``), Chrome (``.crdownload``), generic ``.tmp``:
    written slowly under the temp name, then renamed. Only the final name is ever reported."""
    got = Collector()
    make_watcher([Inbox(inbox)], got)
    temp_names = [".talk.wav.Ab12Cd", "talk.wav.part", "talk.wav.crdownload", "talk.tmp"]
    temps = []
    for i, name in enumerate(temp_names):
        (inbox / f"copy{i}").mkdir()
        temps.append(inbox / f"copy{i}" / name)
    handles = [open(t, "wb") for t in temps]  # noqa: SIM115
    for _ in range(4):
        for f in handles:
            f.write(b"\x05" * 50000)
            f.flush()
        time.sleep(0.2)
    for f in handles:
        f.close()
    time.sleep(SETTLE * 2)  # the temp names settle too, but must never be emitted
    assert got.paths == []
    finals = []
    for temp in temps:
        finals.append(temp.parent / "talk.wav")
        os.rename(temp, finals[-1])
    assert got.wait_count(len(finals), timeout=5)
    time.sleep(SETTLE * 2)
    assert sorted((p, size) for p, size, _ in got.calls) == sorted((f, 200000) for f in finals)


def test_file_moved_in_from_outside_is_emitted(inbox: Path, tmp_path: Path, make_watcher) -> None:
    got = Collector()
    make_watcher([Inbox(inbox)], got)
    outside = write_file(tmp_path / "elsewhere" / "call.m4a", 1234)
    folder = write_file(tmp_path / "album" / "track1.mp3", 10).parent
    write_file(folder / "track2.mp3", 20)
    os.rename(outside, inbox / "call.m4a")
    os.rename(folder, inbox / "album")  # a whole folder moved in
    assert got.wait_count(3, timeout=5)
    time.sleep(SETTLE)
    assert sorted(os.path.relpath(p, inbox) for p in got.paths) == [
        os.path.join("album", "track1.mp3"), os.path.join("album", "track2.mp3"), "call.m4a"
    ]


def test_ignored_names_are_never_emitted(inbox: Path, make_watcher) -> None:
    got = Collector()
    make_watcher([Inbox(inbox)], got)
    for name in [".hidden.wav", "a.wav.part", "a.tmp", "a.wav.crdownload", "a.wav~", "a.wav.partial",
                 ".a.wav.swp", "a.txt", "a.srt", "a.vtt", "a.json", "a.error.txt", "a.whisperd-tmp.wav",
                 "a.txt.whisperd-tmp", "notes.pdf", ".git/objects/x.wav", ".Trash-0/files/y.mp3"]:
        write_file(inbox / name, 100)
    write_file(inbox / "sentinel.wav", 100)
    assert got.wait_count(1, timeout=5)
    time.sleep(SETTLE * 2)
    assert got.paths == [inbox / "sentinel.wav"]
    assert got.paths == [inbox / "sentinel.wav"]


def test_files_present_before_start_are_found_by_startup_scan(inbox: Path, make_watcher) -> None:
    write_file(inbox / "old1.wav", 10)
    write_file(inbox / "deep" / "er" / "old2.ogg", 20)
    write_file(inbox / "old.txt", 30)
    got = Collector()
    make_watcher([Inbox(inbox)], got)
    assert got.wait_count(2, timeout=5)
    time.sleep(SETTLE)
    assert sorted(got.paths) == sorted([inbox / "old1.wav", inbox / "deep" / "er" / "old2.ogg"])


def test_non_recursive_inbox_ignores_subfolders(inbox: Path, make_watcher) -> None:
    write_file(inbox / "sub" / "before.wav")
    got = Collector()
    make_watcher([Inbox(inbox, recursive=False)], got)
    write_file(inbox / "sub" / "after.wav")
    write_file(inbox / "top.wav")
    assert got.wait_count(1, timeout=5)
    time.sleep(SETTLE * 2)
    assert got.paths == [inbox / "top.wav"]


def test_polling_inbox(inbox: Path, make_watcher) -> None:
    """For network shares: no inotify, a PollingObserver notices the file (no rescan involved)."""
    got = Collector()
    w = make_watcher([Inbox(inbox, poll=True)], got, poll_seconds=0.2, rescan_seconds=300)
    target = inbox / "share" / "remote.mp3"
    target.parent.mkdir()
    with open(target, "wb") as f:
        for _ in range(4):
            f.write(b"\x06" * 1000)
            f.flush()
            time.sleep(0.25)
            assert got.paths == []
    assert got.wait_count(1, timeout=5)
    time.sleep(SETTLE * 2)
    assert [(p, size) for p, size, _ in got.calls] == [(target, 4000)]
    assert w.watching == (Inbox(inbox, poll=True),)


@pytest.mark.timeout(60)
def test_many_files_dropped_at_once(inbox: Path, make_watcher) -> None:
    got = Collector()
    make_watcher([Inbox(inbox)], got)
    expected = set()
    for i in range(200):
        expected.add(write_file(inbox / f"batch{i % 4}" / f"clip{i:03}.wav", 512 + i))
    assert got.wait_for(lambda paths: set(paths) >= expected, timeout=20), (
        f"missing {len(expected - set(got.paths))} of 200"
    )
    time.sleep(SETTLE * 2)
    assert len(got.paths) == 200 and set(got.paths) == expected  # each exactly once
    sizes = {p: size for p, size, _ in got.calls}
    assert all(sizes[p] == p.stat().st_size for p in expected)


def test_rescan_does_not_repeat_unchanged_files_but_sees_replacements(inbox: Path, make_watcher) -> None:
    got = Collector()
    w = make_watcher([Inbox(inbox)], got)
    target = write_file(inbox / "a.wav", 100)
    assert got.wait_count(1, timeout=5)
    assert w.rescan_now(wait=True, timeout=5)
    time.sleep(SETTLE * 2)
    assert len(got.paths) == 1
    write_file(inbox / "a.wav", 300)  # replaced: new size, so a new identity downstream
    assert got.wait_count(2, timeout=5)
    assert [(p, size) for p, size, _ in got.calls] == [(target, 100), (target, 300)]


def test_file_deleted_before_settling_is_dropped(inbox: Path, make_watcher) -> None:
    got = Collector()
    w = make_watcher([Inbox(inbox)], got, settle_seconds=1.0)
    target = write_file(inbox / "oops.wav", 100)
    time.sleep(0.3)
    target.unlink()
    write_file(inbox / "kept.wav", 100)
    assert got.wait_count(1, timeout=5)
    time.sleep(1.0)
    assert got.paths == [inbox / "kept.wav"]
    assert w.pending == 0


def test_on_ready_error_is_logged_and_file_offered_again(inbox: Path, make_watcher) -> None:
    calls: list[Path] = []
    fail = threading.Event()
    fail.set()

    def flaky(path: Path, st: os.stat_result) -> None:
        calls.append(path)
        if fail.is_set():
            fail.clear()
            raise RuntimeError("database is locked")

    w = make_watcher([Inbox(inbox)], flaky)
    write_file(inbox / "a.wav")
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.05)
    assert calls == [inbox / "a.wav"]
    w.rescan_now(wait=True, timeout=5)
    deadline = time.monotonic() + 5
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert calls == [inbox / "a.wav"] * 2


def test_update_inboxes_adds_and_removes(tmp_path: Path, make_watcher) -> None:
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b):
        d.mkdir()
    write_file(b / "waiting.wav")
    got = Collector()
    w = make_watcher([Inbox(a), Inbox(c)], got)  # c does not exist yet (share not mounted)
    assert w.watching == (Inbox(a),)
    w.update_inboxes([Inbox(b), Inbox(c)])
    assert got.wait_count(1, timeout=5)  # found by the rescan that follows the reload
    write_file(a / "ignored-now.wav")
    write_file(b / "new.wav")
    c.mkdir()
    write_file(c / "late.wav")
    w.rescan_now(wait=True, timeout=5)  # retries the missing inbox
    assert got.wait_count(3, timeout=5)
    assert set(w.watching) == {Inbox(b), Inbox(c)}
    write_file(c / "live.wav")  # c now has a live watch
    assert got.wait_count(4, timeout=5)
    time.sleep(SETTLE)
    assert sorted(p.name for p in got.paths) == ["late.wav", "live.wav", "new.wav", "waiting.wav"]


def test_inotify_overflow_triggers_rescan_and_releases_open_files(inbox: Path, make_watcher) -> None:
    got = Collector()
    make_watcher([Inbox(inbox)], got, settle_seconds=0.3)
    target = inbox / "held-open.wav"
    with open(target, "wb") as f:
        f.write(b"\x07" * 100)
        f.flush()
        time.sleep(1.0)
        assert got.paths == []  # open for writing: waits for the close
        # What watchdog 7 logs when the kernel queue overflows (the close may be lost):
        logging.getLogger("watchdog.observers.inotify_c").warning(
            "Inotify queue overflowed; filesystem events were lost"
        )
        assert got.wait_count(1, timeout=5)
    assert got.paths == [target]


def _unprivileged_watch(base: str, conn) -> None:  # runs in a forked child
    try:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    except OSError as exc:
        conn.send(("skip", f"cannot drop privileges to nobody: {exc}"))
        return
    try:
        got = Collector()
        inbox = Path(base) / "inbox"
        with structlog.testing.capture_logs() as logs:
            w = Watcher([Inbox(inbox)], got, settle_seconds=SETTLE)
            w.start()
            assert w.rescan_now(wait=True, timeout=10)
            write_file(inbox / "ok" / "after-start.wav")
            got.wait_count(2, timeout=10)
            time.sleep(SETTLE)
            w.stop()
        events = [{k: str(v) for k, v in e.items()} for e in logs]
        conn.send(("ok", sorted(str(p) for p in got.paths), events))
    except BaseException as exc:  # report, don't hang the parent
        conn.send(("error", repr(exc)))


def test_unreadable_subfolder_does_not_break_the_watcher() -> None:
    """A chmod-000 folder in the inbox, read by a non-root user: logged, skipped, the rest works.

    Root ignores file modes, so when the tests run as root the watcher runs in a forked child that
    drops to the ``nobody`` user first; otherwise it runs here."""
    base = tempfile.mkdtemp(prefix="whisperd-unreadable-")  # in /tmp: reachable by nobody
    try:
        inbox = Path(base) / "inbox"
        write_file(inbox / "ok" / "before.wav")
        write_file(inbox / "locked" / "secret.wav")
        if os.geteuid() == 0:
            for root, dirs, files in os.walk(base):
                for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                    os.chown(name, 65534, 65534)
            os.chmod(base, 0o755)
        os.chmod(inbox / "locked", 0o000)
        if os.geteuid() == 0:
            ctx = multiprocessing.get_context("fork")
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_unprivileged_watch, args=(base, child))
            proc.start()
            if not parent.poll(25):
                proc.kill()
                pytest.fail("unprivileged watcher did not report")
            result = parent.recv()
            proc.join(5)
        else:
            result = _watch_inline(base)
        if result[0] == "skip":
            pytest.skip(result[1])
        assert result[0] == "ok", result
        _, paths, events = result
        assert paths == [str(inbox / "ok" / "after-start.wav"), str(inbox / "ok" / "before.wav")]
        assert any(
            e["event"] == "folder unreadable skipped" and e["folder"] == str(inbox / "locked")
            for e in events
        ), events
    finally:
        os.chmod(os.path.join(base, "inbox", "locked"), 0o755)
        shutil.rmtree(base, ignore_errors=True)


def _watch_inline(base: str) -> tuple:
    """Non-root runs: the same scenario in this process (file modes already apply)."""
    got = Collector()
    inbox = Path(base) / "inbox"
    with structlog.testing.capture_logs() as logs:
        w = Watcher([Inbox(inbox)], got, settle_seconds=SETTLE)
        w.start()
        try:
            assert w.rescan_now(wait=True, timeout=10)
            write_file(inbox / "ok" / "after-start.wav")
            got.wait_count(2, timeout=10)
            time.sleep(SETTLE)
        finally:
            w.stop()
    return ("ok", sorted(str(p) for p in got.paths), [{k: str(v) for k, v in e.items()} for e in logs])


def test_inbox_deleted_and_recreated_is_watched_again(inbox: Path, make_watcher) -> None:
    got = Collector()
    w = make_watcher([Inbox(inbox)], got)
    shutil.rmtree(inbox)
    time.sleep(0.3)
    inbox.mkdir()
    assert w.rescan_now(wait=True, timeout=5)  # notices the dead watch and watches the new folder
    assert w.watching == (Inbox(inbox),)
    write_file(inbox / "again.wav")  # seen live, not only by a later scan
    assert got.wait_count(1, timeout=5)
    assert got.paths == [inbox / "again.wav"]
