"""Writing beside untrusted files, and opening recordings from untrusted folders (no model needed)."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from whisperd.atomic import atomic_write_text, commit, current_umask, mode_like, stage_bytes
from whisperd.naming import NameTooLongError, error_file_for, stale_temps_for, temp_prefix_for
from whisperd.recording import RecordingGone, RecordingRefused, open_recording


def test_a_link_planted_at_the_output_name_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "talk.txt"
    target.symlink_to(victim)
    atomic_write_text(target, "transcript")
    assert victim.read_text() == "precious"
    assert not target.is_symlink() and target.read_text() == "transcript"


def test_temp_files_are_created_new_and_never_reuse_a_planted_file(tmp_path: Path) -> None:
    target = tmp_path / "talk.txt"
    staged = stage_bytes(target, b"new")
    assert staged.temp.name.startswith(temp_prefix_for(target))
    assert stat.S_IMODE(os.lstat(staged.temp).st_mode) == 0o666 & ~current_umask()
    # Someone swaps the temp file for a link before the rename: nothing is renamed into place.
    victim = tmp_path / "victim"
    victim.write_text("precious")
    staged.temp.unlink()
    staged.temp.symlink_to(victim)
    with pytest.raises(OSError, match="replaced by someone else"):
        commit([staged])
    assert not target.exists() and not os.path.lexists(staged.temp) and victim.read_text() == "precious"


def test_a_set_is_renamed_together_or_not_at_all(tmp_path: Path) -> None:
    staged = [stage_bytes(tmp_path / f"talk.{ext}", ext.encode()) for ext in ("txt", "srt")]

    def recording_vanished() -> None:
        raise RecordingGone("talk.wav was deleted during the job")

    with pytest.raises(RecordingGone):
        commit(staged, recording_vanished)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_outputs_are_no_more_readable_than_their_source() -> None:
    assert mode_like(0o100600) == 0o600
    assert mode_like(0o100640) & 0o004 == 0
    assert mode_like(0o100755) & 0o111 == 0


def test_names_at_the_limit_get_short_temp_names_and_too_long_ones_a_clear_error(tmp_path: Path) -> None:
    fits = tmp_path / ("x" * 251 + ".txt")  # 255 bytes: the temp name must not grow from it
    atomic_write_text(fits, "ok")
    assert fits.read_text() == "ok"
    with pytest.raises(NameTooLongError, match="over this folder's limit of 255"):
        atomic_write_text(tmp_path / ("y" * 251 + ".json"), "too long")
    assert sorted(p.name for p in tmp_path.iterdir()) == [fits.name]


def test_notes_for_names_that_are_not_utf8_are_written(tmp_path: Path) -> None:
    audio = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9.mp3"))
    atomic_write_text(error_file_for(audio), f"whisperd could not transcribe {audio.name}")
    note = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9.error.txt"))
    assert "caf\\udce9.mp3" in note.read_text(encoding="utf-8")


def test_stale_temps_are_found_per_recording(tmp_path: Path) -> None:
    audio = tmp_path / "talk.wav"
    mine = [Path(stage_bytes(tmp_path / name, b"x").temp) for name in ("talk.txt", "talk.srt", "talk.error.txt")]
    other = stage_bytes(tmp_path / "other.txt", b"x").temp
    assert sorted(stale_temps_for(audio, ("txt", "srt", "vtt", "json"))) == sorted(mine)
    assert other.exists()


def _open_in_thread(*args: object) -> BaseException | None:
    """open_recording in a thread, so that a regression (blocking on a FIFO) fails instead of hanging."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            open_recording(*args).close()  # type: ignore[arg-type]
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(5)
    assert outcome, "open_recording blocked"
    return outcome[0]


def test_a_fifo_named_like_a_recording_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "talk.wav"
    os.mkfifo(fifo)
    error = _open_in_thread(fifo, tmp_path)
    assert isinstance(error, RecordingRefused) and "a FIFO" in str(error)


def test_links_that_leave_the_inbox_are_refused_unless_allowed(tmp_path: Path) -> None:
    inbox, outside = tmp_path / "inbox", tmp_path / "other-team"
    inbox.mkdir()
    outside.mkdir()
    (outside / "secret.wav").write_bytes(b"RIFF....")
    (inbox / "sub").mkdir()
    (inbox / "sub" / "real.wav").write_bytes(b"RIFF....")
    (inbox / "escape.wav").symlink_to(outside / "secret.wav")
    (inbox / "inside.wav").symlink_to(inbox / "sub" / "real.wav")
    error = _open_in_thread(inbox / "escape.wav", inbox)
    assert isinstance(error, RecordingRefused) and "outside its inbox" in str(error)
    assert _open_in_thread(inbox / "escape.wav", inbox, True) is None
    assert _open_in_thread(inbox / "inside.wav", inbox) is None


def test_a_recording_deleted_or_replaced_during_the_job_is_noticed(tmp_path: Path) -> None:
    audio = tmp_path / "talk.wav"
    audio.write_bytes(b"one")
    with open_recording(audio) as recording:
        recording.check_unchanged()
        assert recording.read_path.read_bytes() == b"one"
        audio.unlink()
        assert recording.read_path.read_bytes() == b"one"  # still readable through the descriptor
        with pytest.raises(RecordingGone, match="deleted or moved away"):
            recording.check_unchanged()
    audio.write_bytes(b"two")
    with open_recording(audio) as recording:
        replacement = tmp_path / "new.wav"
        replacement.write_bytes(b"three")
        replacement.replace(audio)
        with pytest.raises(RecordingGone, match="replaced"):
            recording.check_unchanged()
