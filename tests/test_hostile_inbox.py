"""End to end: an inbox written by an unfriendly colleague, and a daemon killed at the worst moment.

Real daemon, real model, real speech, real links and databases. What must hold: nothing is written
through a planted link, no recording outside the inbox is read through a link, outputs are no more
readable than their recording, every odd name ends in a clear state, a job is never redone once its
outputs are in place, and a recording that vanishes mid-job gets no transcript.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_harness import (
    TEMP_OUTPUT_GLOB,
    clip,
    final_row,
    long_recording,
    rows_for,
    running_daemon,
    wait_for,
    whisperd_cli,
    write_config,
    write_rules,
)
from whisperd.jobstore import SqliteJobStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def setup_inbox(tmp_path: Path, **settings: object) -> tuple[Path, Path, Path]:
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    config = write_config(tmp_path / "whisperd.yaml", [{"path": "inbox"}], state, **settings)
    return config, inbox, state


def bytes_path(folder: Path, name: bytes) -> Path:
    return Path(os.fsdecode(os.fsencode(str(folder)) + b"/" + name))


def test_links_modes_and_odd_names(tmp_path: Path) -> None:
    config, inbox, state = setup_inbox(tmp_path)
    outside = tmp_path / "other-team"
    outside.mkdir()
    speech = clip("en_goforward").path
    victims = {name: outside / name for name in ("victim-note.txt", "victim-output.txt")}
    for victim in victims.values():
        victim.write_text("precious")
    shutil.copyfile(speech, outside / "secret.wav")

    escape = inbox / "escape.wav"  # a link to another team's recording
    escape.symlink_to(outside / "secret.wav")
    bad = inbox / "bad.mp3"  # not audio, with a link planted where its error note goes
    bad.write_text("this is not audio\n")
    (inbox / "bad.error.txt").symlink_to(victims["victim-note.txt"])
    private = inbox / "private.wav"  # owner-only recording, with a link planted at its .txt
    shutil.copyfile(speech, private)
    private.chmod(0o600)
    (inbox / "private.txt").symlink_to(victims["victim-output.txt"])
    long_name = inbox / ("x" * 250 + ".wav")  # 254 bytes: its temp files must still fit
    shutil.copyfile(speech, long_name)
    json_folder = inbox / "json"
    write_rules(json_folder, outputs=["txt", "json"])
    too_long = json_folder / ("y" * 251 + ".wav")  # its .json would be 256 bytes
    shutil.copyfile(speech, too_long)
    not_utf8 = bytes_path(inbox, b"caf\xe9.mp3")  # fails, and its name is not UTF-8
    not_utf8.write_text("not audio either\n")
    no_extension = inbox / "standup-recording"
    shutil.copyfile(speech, no_extension)

    with running_daemon(config, tmp_path / "daemon.log") as daemon:
        rows = {p: final_row(state, p) for p in (escape, bad, private, long_name, too_long, not_utf8)}
        status = whisperd_cli("status", "--config", str(config))
        daemon.check_alive("after the hostile inbox")

    assert rows[escape].state == "failed" and "outside its inbox" in (rows[escape].last_error or "")
    assert not (inbox / "escape.txt").exists(), "a recording outside the inbox was transcribed into it"
    assert "outside its inbox" in (inbox / "escape.error.txt").read_text()

    assert rows[bad].state == "failed"
    assert victims["victim-note.txt"].read_text() == "precious"
    assert not (inbox / "bad.error.txt").is_symlink() and "bad.mp3" in (inbox / "bad.error.txt").read_text()

    assert rows[private].state == "done", rows[private].last_error
    assert victims["victim-output.txt"].read_text() == "precious"
    for output in (inbox / "private.txt", inbox / "private.srt"):
        assert not output.is_symlink()
        assert stat.S_IMODE(output.stat().st_mode) == 0o600, output

    assert rows[long_name].state == "done", rows[long_name].last_error
    assert long_name.with_suffix(".txt").read_text().strip()

    assert rows[too_long].state == "failed" and rows[too_long].attempts == 1
    assert "give the recording a shorter name" in (rows[too_long].last_error or "")
    assert not too_long.with_suffix(".txt").exists(), "a partial output set was left"

    assert rows[not_utf8].state == "failed" and rows[not_utf8].attempts == 1
    assert bytes_path(inbox, b"caf\xe9.error.txt").is_file()

    assert status.returncode == 0, status.stderr
    assert "standup-recording: no file extension" in status.stdout, status.stdout
    assert not list(inbox.rglob(TEMP_OUTPUT_GLOB))


def test_links_outside_are_transcribed_when_the_inbox_allows_it(tmp_path: Path) -> None:
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    config = write_config(tmp_path / "whisperd.yaml", [{"path": "inbox", "follow_links_outside": True}], state)
    (tmp_path / "shared.wav").write_bytes(clip("en_goforward").path.read_bytes())
    (inbox / "shared.wav").symlink_to(tmp_path / "shared.wav")
    with running_daemon(config, tmp_path / "daemon.log"):
        assert final_row(state, inbox / "shared.wav").state == "done"
    assert (inbox / "shared.txt").read_text().strip()


def test_a_job_killed_after_its_outputs_were_written_is_not_redone(tmp_path: Path) -> None:
    """The state a SIGKILL leaves between the last rename and `done`: the job is `running`, its outputs
    are in place. A job killed between two renames (a partial set) is redone."""
    config, inbox, state = setup_inbox(tmp_path)
    complete, partial = inbox / "complete.wav", inbox / "partial.wav"
    for audio in (complete, partial):
        shutil.copyfile(clip("en_goforward").path, audio)
    past = time.time() - 60
    for audio in (complete, partial):
        os.utime(audio, (past, past))
    store = SqliteJobStore(state / "jobs.sqlite3")
    for audio in (complete, partial):
        st = audio.stat()
        store.enqueue(audio, st.st_size, st.st_mtime_ns)
        assert store.claim_next() is not None
    store.close()
    complete.with_suffix(".txt").write_text("written before the kill\n")
    complete.with_suffix(".srt").write_text("1\n00:00:00,000 --> 00:00:01,000\nwritten before the kill\n")
    partial.with_suffix(".txt").write_text("half a set\n")
    written_at = complete.with_suffix(".txt").stat().st_mtime_ns

    with running_daemon(config, tmp_path / "daemon.log") as daemon:
        assert daemon.named("daemon starting")[0]["requeued_after_crash"] == 2
        assert final_row(state, complete).state == "done"
        assert final_row(state, partial).state == "done"
        assert not daemon.named("job started", path=str(complete)), "a job whose outputs were in place was redone"
        assert len(daemon.named("job started", path=str(partial))) == 1
    assert complete.with_suffix(".txt").stat().st_mtime_ns == written_at
    assert partial.with_suffix(".txt").read_text() != "half a set\n"
    assert partial.with_suffix(".srt").is_file()


def test_a_recording_deleted_during_its_job_gets_no_transcript(tmp_path: Path) -> None:
    config, inbox, state = setup_inbox(tmp_path)
    long = inbox / "long.wav"
    shutil.copyfile(long_recording().path, long)
    with running_daemon(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_event("job started", path=str(long))
        time.sleep(1.0)
        long.unlink()
        row = wait_for(lambda: next((r for r in rows_for(state, long) if r.state == "superseded"), None), 600,
                       "the deleted recording's job to be dropped")
        assert "deleted" in (row.last_error or "")
        after = inbox / "after.wav"
        shutil.copyfile(clip("en_goforward").path, after)
        assert final_row(state, after).state == "done", "the queue stopped after the deleted recording"
    assert not list(inbox.glob("long.*")), "outputs were written next to a deleted recording"
    assert not list(inbox.glob(TEMP_OUTPUT_GLOB))


def run_daemon_briefly(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "whisperd", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_an_unusable_job_database_stops_the_daemon_with_a_clear_message(tmp_path: Path) -> None:
    config, inbox, state = setup_inbox(tmp_path)
    state.mkdir()
    database = state / "jobs.sqlite3"
    database.write_bytes(b"this is not a database, it was overwritten by mistake\n" * 100)
    result = run_daemon_briefly(config)
    assert result.returncode == 78, result.stderr
    assert "cannot be used" in result.stderr and "Traceback" not in result.stderr + result.stdout

    database.unlink()
    SqliteJobStore(database).close()  # a valid database, then made immutable: it can be read, not written
    made_immutable = subprocess.run(["chattr", "+i", str(database)], capture_output=True, text=True)
    assert made_immutable.returncode == 0, f"chattr +i (e2fsprogs, as root) is needed here: {made_immutable.stderr}"
    try:
        result = run_daemon_briefly(config)
    finally:
        subprocess.run(["chattr", "-i", str(database)], check=True)
    assert result.returncode == 78, result.stderr
    assert "cannot be used" in result.stderr and "readonly" in result.stderr


def test_reload_into_an_engine_that_cannot_load_keeps_the_old_one(tmp_path: Path) -> None:
    """The real-process twin of test_runner's fast check: SIGHUP with a model that does not exist
    keeps the running engine, and the queue keeps moving on it."""
    config, inbox, state = setup_inbox(tmp_path)
    with running_daemon(config, tmp_path / "daemon.log", engine_flags=False) as daemon:
        write_config(config, [{"path": "inbox"}], state, engine={"model": str(tmp_path / "no-such-model")})
        daemon.send(signal.SIGHUP)
        failed = daemon.wait_event("new engine settings cannot load; keeping the old ones", timeout=120)
        assert "no-such-model" in failed["error"]
        target = inbox / "after-reload.wav"
        shutil.copyfile(clip("en_goforward").path, target)
        assert final_row(state, target).state == "done"
        daemon.check_alive("after the failed reload")
        assert len(daemon.named("worker ready")) == 2  # the first start, and the old engine again
