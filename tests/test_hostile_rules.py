"""Rule files written to hurt the daemon, end to end: a real daemon, the real model, real speech.

Anyone who can drop a recording into an inbox can also drop a `.whisperd.yaml` next to it. A FIFO
(reading it would wait for a writer forever, under the lock every folder needs), a link to
/dev/zero (endless) and an alias bomb (billions of values from a few lines) must each fail only
the jobs in their own folder, with a note saying why, while the daemon stays small and keeps
transcribing everything else.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from daemon_harness import DaemonProcess, Row, clip, rows_for, running_daemon, transcript_error, wait_for, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

T = TypeVar("T")

MAX_DAEMON_RSS = 1536 * 1024 * 1024  # the daemon process alone; the worker holds the model
FAIL_TIMEOUT = 60.0  # a rule error fails the job right after the settle window
DONE_TIMEOUT = 180.0  # one 3 s clip, on a busy 2-core machine

ALIAS_BOMB = "\n".join([
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
    *(f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]" for p, c in zip("abcdefgh", "bcdefghi")),
    "language: *i",
]) + "\n"


def watched(daemon: DaemonProcess, predicate: Callable[[], T], timeout: float, what: str) -> T:
    """wait_for, failing at once if the daemon dies or outgrows MAX_DAEMON_RSS meanwhile (a
    regression reading /dev/zero grows by gigabytes a second: stop it before the machine does)."""
    def check() -> T:
        daemon.check_alive(f"waiting for {what}")
        rss = daemon.rss_bytes()["daemon"]
        assert rss < MAX_DAEMON_RSS, f"the daemon grew to {rss / 2**20:.0f} MiB while waiting for {what}"
        return predicate()

    return wait_for(check, timeout, what, interval=0.1)


def finished(state: Path, path: Path) -> Callable[[], Row | None]:
    def row() -> Row | None:
        rows = [r for r in rows_for(state, path) if r.state in ("done", "failed")]
        return rows[-1] if rows else None

    return row


def test_hostile_rule_files_fail_their_own_folders_only(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    hostile = {"fifo": "is a FIFO", "dev_zero": "is a symbolic link", "alias_bomb": "aliases are not allowed"}
    for folder in (*hostile, "healthy"):
        (inbox / folder).mkdir(parents=True)
    os.mkfifo(inbox / "fifo" / ".whisperd.yaml")
    (inbox / "dev_zero" / ".whisperd.yaml").symlink_to("/dev/zero")
    (inbox / "alias_bomb" / ".whisperd.yaml").write_text(ALIAS_BOMB, encoding="utf-8")
    config = write_config(tmp_path / "whisperd.yaml", [{"path": "inbox", "rules": {"outputs": ["txt"]}}],
                          tmp_path / "state")
    state = tmp_path / "state"
    speech = clip("en_goforward")

    with running_daemon(config, tmp_path / "daemon.log") as daemon:
        # One folder at a time, the FIFO first: a daemon that still waits on it fails here, before
        # anything could make it read /dev/zero.
        for folder, wording in hostile.items():
            audio = inbox / folder / "talk.wav"
            shutil.copyfile(speech.path, audio)
            row = watched(daemon, finished(state, audio), FAIL_TIMEOUT, f"{folder}/talk.wav to fail")
            rule_file = inbox / folder / ".whisperd.yaml"
            assert row.state == "failed", row
            assert row.last_error is not None and row.last_error.startswith(f"{rule_file}: ")
            assert wording in row.last_error and len(row.last_error) < 500, row.last_error
            note = audio.with_name("talk.error.txt").read_text(encoding="utf-8")
            assert str(rule_file) in note and wording in note
            assert not audio.with_suffix(".txt").exists()

        healthy = inbox / "healthy" / "talk.wav"
        shutil.copyfile(speech.path, healthy)
        row = watched(daemon, finished(state, healthy), DONE_TIMEOUT, "healthy/talk.wav to be transcribed")
        assert row.state == "done", row.last_error
        txt = healthy.with_suffix(".txt")
        assert txt.is_file() and transcript_error(speech, txt) <= 0.25, txt.read_text()
        assert not healthy.with_name("talk.error.txt").exists()

        daemon.check_alive("after the hostile rule files")
        rss = daemon.rss_bytes()["daemon"]
        print(f"daemon RSS at the end: {rss / 2**20:.0f} MiB")
        assert rss < MAX_DAEMON_RSS
