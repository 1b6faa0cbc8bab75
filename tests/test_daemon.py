"""`whisperd run` end to end, one shared daemon: files dropped into its inbox, outputs read back.

One daemon serves every test in this module (loading the model is the slow part); the tests run
in file order and the last one checks what only holds across all of them (the model loaded once,
every file transcribed exactly once).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import srt

from daemon_harness import (
    CJK,
    RESCAN_SECONDS,
    SETTLE_SECONDS,
    TEMP_OUTPUT_GLOB,
    DaemonProcess,
    Row,
    clip,
    encode,
    final_row,
    job_rows,
    parse_time,
    queue_idle,
    rows_for,
    transcript_error,
    wait_for,
    whisperd_cli,
    write_config,
    write_rules,
    write_slowly,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MAX_WER = 0.2


@dataclass
class Shared:
    daemon: DaemonProcess
    config: Path
    inbox: Path
    state: Path

    def drop(self, source: Path, relative: str) -> Path:
        """Copy a file into the inbox the ordinary way (create, write, close)."""
        target = self.inbox / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return target

    def finished(self, path: Path, timeout: float = 300) -> Row:
        """The job's final row, once its log line is out too (the row is written just before it)."""
        self.daemon.check_alive(f"waiting for {path.name}")
        row = final_row(self.state, path, timeout)
        self.daemon.wait_event("job done" if row.state == "done" else "job failed", 30, path=str(path))
        return row


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    root = tmp_path_factory.mktemp("daemon")
    inbox = root / "inbox"
    inbox.mkdir()
    write_rules(inbox / "translate_zh", language="zh", task="translate", outputs=["txt"])
    write_rules(inbox / "editable", outputs=["txt"])
    write_rules(inbox / "word_timed", word_timestamps=True, outputs=["json", "srt"])
    write_rules(inbox / "bad_task", task="transcrbe")
    write_rules(inbox / "bad_language", language="klingon")
    config = write_config(root / "whisperd.yaml", [{"path": "inbox", "rules": {"outputs": ["txt", "srt"]}}],
                          root / "state")
    daemon = DaemonProcess(config, root / "daemon.log").start()
    try:
        daemon.wait_ready()
        yield Shared(daemon, config, inbox, root / "state")
    finally:
        daemon.kill_all()


def assert_transcribed_once(shared: Shared, path: Path) -> Row:
    rows = rows_for(shared.state, path)
    assert [r.state for r in rows] == ["done"], f"{path.name}: rows {[(r.state, r.last_error) for r in rows]}"
    assert len(shared.daemon.named("job done", path=str(path))) == 1
    return rows[0]


# -- formats ------------------------------------------------------------------------------------


def test_wav_mp3_m4a_are_transcribed_once_with_correct_text(shared: Shared, tmp_path: Path) -> None:
    sources = {
        "talk_wav.wav": clip("en_librivox_ss01_0880"),
        "talk_mp3.mp3": clip("en_librivox_ss01_0930"),
        "talk_m4a.m4a": clip("en_goforward"),
    }
    encode(sources["talk_mp3.mp3"].path, tmp_path / "talk_mp3.mp3", "libmp3lame")
    encode(sources["talk_m4a.m4a"].path, tmp_path / "talk_m4a.m4a", "aac")
    dropped = {
        shared.drop(sources["talk_wav.wav"].path, "talk_wav.wav"): sources["talk_wav.wav"],
        shared.drop(tmp_path / "talk_mp3.mp3", "talk_mp3.mp3"): sources["talk_mp3.mp3"],
        shared.drop(tmp_path / "talk_m4a.m4a", "talk_m4a.m4a"): sources["talk_m4a.m4a"],
    }
    for path, source in dropped.items():
        row = shared.finished(path)
        assert row.state == "done", row.last_error
        txt, srt_file = path.with_suffix(".txt"), path.with_suffix(".srt")
        assert txt.is_file() and srt_file.is_file()
        wer = transcript_error(source, txt)
        print(f"{path.name}: WER {wer:.3f}: {txt.read_text().strip()!r}")
        assert wer <= MAX_WER, f"{path.name}: {txt.read_text()!r} vs {source.reference!r}"
        cues = list(srt.parse(srt_file.read_text(encoding="utf-8")))
        assert cues and " ".join(c.content for c in cues).split() == txt.read_text().split()
        assert row.language == "en"
    for path in dropped:
        assert_transcribed_once(shared, path)
    assert not list(shared.inbox.glob(TEMP_OUTPUT_GLOB))


# -- files that arrive slowly -------------------------------------------------------------------


def test_file_written_slowly_is_transcribed_once_when_complete(shared: Shared) -> None:
    source = clip("en_librivox_ss01_0890")  # ends "... is to be ill disposed"
    data = source.path.read_bytes()
    target = shared.inbox / "slow_writer.wav"
    # Pauses longer than the settle window, file open throughout: only the close says it is done.
    closed_at = write_slowly(target, data, chunks=8, pause=SETTLE_SECONDS * 1.6)
    row = shared.finished(target)
    assert row.state == "done", row.last_error
    assert row.size == len(data)
    queued = shared.daemon.named("job queued", path=str(target))
    assert len(queued) == 1 and parse_time(queued[0]["timestamp"]) >= closed_at - 0.05
    text = target.with_suffix(".txt").read_text()
    assert transcript_error(source, target.with_suffix(".txt")) <= MAX_WER, text
    assert "disposed" in text.lower(), f"the end of the clip is missing: {text!r}"
    assert_transcribed_once(shared, target)


def test_temp_name_then_rename_is_transcribed_once(shared: Shared) -> None:
    source = clip("en_librivox_ss01_0930")
    temp = shared.inbox / ".renamed.wav.Xy12Ab"  # rsync's temp name for renamed.wav
    write_slowly(temp, source.path.read_bytes(), chunks=4, pause=SETTLE_SECONDS * 1.6)
    target = shared.inbox / "renamed.wav"
    temp.rename(target)
    row = shared.finished(target)
    assert row.state == "done", row.last_error
    assert transcript_error(source, target.with_suffix(".txt")) <= MAX_WER
    assert_transcribed_once(shared, target)
    assert not [r for r in job_rows(shared.state) if r.path.name.startswith(".")]


# -- bad input ----------------------------------------------------------------------------------


def test_bad_files_fail_with_a_reason_and_the_daemon_keeps_going(shared: Shared, tmp_path: Path) -> None:
    header = clip("en_librivox_ss01_0880").path.read_bytes()[:12]
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(header + bytes((i * 7919) % 251 for i in range(20000)))  # RIFF, then noise
    text = tmp_path / "notes.wav"
    text.write_text("meeting notes, not a recording\n" * 20)
    expected = {
        shared.drop(corrupt, "bad/corrupt.wav"): "damaged",
        shared.drop(text, "bad/notes.wav"): "not an audio file",
    }
    empty = shared.inbox / "bad" / "empty.wav"
    empty.touch()
    expected[empty] = "empty file (0 bytes)"
    for path, reason in expected.items():
        row = shared.finished(path, timeout=120)
        assert row.state == "failed", f"{path.name} ended {row.state}"
        assert reason in (row.last_error or ""), row.last_error
        assert row.attempts == 1, "a file that cannot decode is not worth a retry"
        note = path.with_name(path.stem + ".error.txt")
        assert note.is_file(), f"no {note.name} beside {path.name}"
        assert path.name in note.read_text() and reason in note.read_text()
        assert not path.with_suffix(".txt").exists()
    shared.daemon.check_alive("after the bad files")
    good = shared.drop(clip("en_goforward").path, "bad/after_bad.wav")
    assert shared.finished(good).state == "done"
    assert transcript_error(clip("en_goforward"), good.with_suffix(".txt")) <= MAX_WER


# -- folder rules -------------------------------------------------------------------------------


def test_translate_folder_gives_english_for_mandarin(shared: Shared) -> None:
    path = shared.drop(clip("zh_aishell1_BAC009S0764W0121").path, "translate_zh/zh_news.wav")
    row = shared.finished(path, timeout=420)
    assert row.state == "done", row.last_error
    text = path.with_suffix(".txt").read_text(encoding="utf-8")
    print(f"translated: {text.strip()!r}")
    assert not CJK.search(text), f"translation still has CJK text: {text!r}"
    assert sum(w.isascii() and w.isalpha() for w in text.replace(".", " ").replace(",", " ").split()) >= 2, text
    assert not path.with_suffix(".srt").exists(), "the folder's outputs: [txt] replaces the inbox default"
    started = shared.daemon.named("job started", path=str(path))[0]
    assert (started["language"], started["task"]) == ("zh", "translate")
    assert started["rules"] == [str(shared.inbox / "translate_zh" / ".whisperd.yaml")]


def test_word_timestamps_folder_writes_timed_words(shared: Shared) -> None:
    c = clip("en_librivox_ss01_0870")
    path = shared.drop(c.path, "word_timed/interview.wav")
    assert shared.finished(path).state == "done"
    result = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    words = [w for seg in result["segments"] for w in seg["words"]]
    assert len(words) == len(" ".join(seg["text"] for seg in result["segments"]).split())
    assert all(0 <= w["start"] <= w["end"] <= c.duration_s + 0.01 for w in words)
    assert [w["start"] for w in words] == sorted(w["start"] for w in words)
    assert path.with_suffix(".srt").is_file() and not path.with_suffix(".txt").exists()


def test_edited_rule_file_changes_the_next_job(shared: Shared) -> None:
    source = clip("en_goforward").path
    first = shared.drop(source, "editable/first.wav")
    assert shared.finished(first).state == "done"
    assert first.with_suffix(".txt").is_file()
    assert not first.with_suffix(".srt").exists() and not first.with_suffix(".vtt").exists()
    write_rules(shared.inbox / "editable", outputs=["txt", "vtt"])
    second = shared.drop(source, "editable/second.wav")
    assert shared.finished(second).state == "done"
    assert second.with_suffix(".txt").is_file() and second.with_suffix(".vtt").is_file()
    assert second.with_suffix(".vtt").read_text().startswith("WEBVTT")
    assert not second.with_suffix(".srt").exists()
    assert not first.with_suffix(".vtt").exists(), "an edit applies to the next job, not to finished ones"


@pytest.mark.parametrize(("folder", "key", "wording"), [
    ("bad_task", "task", "'transcribe' or 'translate'"),
    ("bad_language", "language", "unknown language 'klingon'"),
])
def test_invalid_rule_file_fails_its_folder_only(shared: Shared, folder: str, key: str, wording: str) -> None:
    source = clip("en_librivox_ss01_0930").path
    bad = shared.drop(source, f"{folder}/meeting.wav")
    good = shared.drop(source, f"fine_{folder}/meeting.wav")
    row = shared.finished(bad, timeout=120)
    rule_file = shared.inbox / folder / ".whisperd.yaml"
    assert row.state == "failed"
    assert str(rule_file) in row.last_error and f"key '{key}'" in row.last_error and wording in row.last_error
    note = bad.with_name("meeting.error.txt").read_text()
    assert str(rule_file) in note and f"key '{key}'" in note
    assert shared.finished(good).state == "done"


# -- latency, status ----------------------------------------------------------------------------


def test_pickup_latency(shared: Shared) -> None:
    wait_for(lambda: queue_idle(shared.state), 600, "the queue to drain")
    target = shared.inbox / "latency.wav"
    closed_at = write_slowly(target, clip("en_goforward").path.read_bytes(), chunks=1, pause=0)
    started = shared.daemon.wait_event("job started", path=str(target))
    queued = shared.daemon.named("job queued", path=str(target))[0]
    to_queue = parse_time(queued["timestamp"]) - closed_at
    to_start = parse_time(started["timestamp"]) - closed_at
    print(f"pick-up latency: file closed -> job queued {to_queue:.2f} s, -> job started {to_start:.2f} s "
          f"(settle {SETTLE_SECONDS} s)")
    assert 0 <= to_queue <= to_start < SETTLE_SECONDS + 2.0
    assert shared.finished(target).state == "done"


def test_daemon_adds_at_most_half_a_second_to_settle_and_inference(shared: Shared) -> None:
    """A 13 s recording into a warm daemon: closed -> outputs written within settle + the worker's
    own time for the job + 0.5 s (queueing, handing the job over, reporting back)."""
    wait_for(lambda: queue_idle(shared.state), 600, "the queue to drain")
    target = shared.inbox / "overhead.wav"
    closed_at = write_slowly(target, clip("en_mfa_mfa_surround").path.read_bytes(), chunks=1, pause=0)
    assert shared.finished(target).state == "done"
    done = shared.daemon.named("job done", path=str(target))[0]
    total = parse_time(done["timestamp"]) - closed_at
    overhead = total - SETTLE_SECONDS - done["wall_seconds"]
    print(f"closed -> done {total:.2f} s = settle {SETTLE_SECONDS} s + job {done['wall_seconds']:.2f} s "
          f"+ daemon {overhead:.2f} s")
    assert overhead <= 0.5


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes (all their threads), from /proc."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / os.sysconf("SC_CLK_TCK")


def test_idle_daemon_and_worker_use_no_measurable_cpu(shared: Shared) -> None:
    wait_for(lambda: queue_idle(shared.state), 600, "the queue to drain")
    time.sleep(2.0)  # let the last job's threads go to sleep
    pids = [shared.daemon.pid, *shared.daemon.worker_pids]
    before, started = cpu_seconds(pids), time.monotonic()
    time.sleep(10.0)
    used, elapsed = cpu_seconds(pids) - before, time.monotonic() - started
    print(f"idle: {used:.2f} CPU s in {elapsed:.1f} s ({100 * used / elapsed:.2f} % of one core), "
          f"rescanning every {RESCAN_SECONDS} s")
    assert used / elapsed < 0.01


def test_status_while_running(shared: Shared) -> None:
    probe = shared.inbox / "status_probe.wav"
    probe.write_text("not audio\n")
    assert shared.finished(probe, timeout=120).state == "failed"
    wait_for(lambda: queue_idle(shared.state), 300, "the queue to drain")
    rows = job_rows(shared.state)
    text = whisperd_cli("status", "--config", str(shared.config))
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert f"daemon: running, pid {shared.daemon.pid}, ready, worker pid {next(iter(shared.daemon.worker_pids))}" in out
    assert re.search(r"model openai/whisper-base on cpu \((openvino|transformers), \w+\)", out, re.IGNORECASE), out
    done, failed = [r for r in rows if r.state == "done"], [r for r in rows if r.state == "failed"]
    assert f"jobs: 0 queued, 0 running, {len(done)} done, {len(failed)} failed" in out
    assert "recent failures:" in out and f"{probe}" in out and "not an audio file" in out
    if done:
        assert "recently done:" in out and str(max(done, key=lambda r: r.finished_at or 0).path) in out
    report = json.loads(whisperd_cli("status", "--config", str(shared.config), "--json").stdout)
    assert report["daemon"]["alive"] and report["daemon"]["ready"]
    assert report["daemon"]["pid"] == shared.daemon.pid
    assert report["counts"]["done"] == len(done) and report["counts"]["failed"] == len(failed)
    assert report["failures"][0]["path"] == str(probe)
    assert {f["path"] for f in report["failures"]} == {str(r.path) for r in failed[-10:]}


# -- across the whole module --------------------------------------------------------------------


def test_model_loaded_once_and_every_file_done_exactly_once(shared: Shared) -> None:
    daemon = shared.daemon
    assert len(daemon.named("worker ready")) == 1
    assert len(daemon.named("model loaded")) == 1
    rows = job_rows(shared.state)
    done = [r for r in rows if r.state == "done"]
    worker_pid = daemon.named("worker ready")[0]["worker_pid"]
    assert {r.extra["worker_pid"] for r in done} == {worker_pid}
    assert {r.worker_pid for r in done} == {worker_pid}
    assert daemon.status_file()["worker_pid"] == worker_pid
    assert daemon.status_file()["worker_starts"] == 1
    paths = [r.path for r in rows]
    assert len(paths) == len(set(paths)), "a file got a second job"
    for row in done:
        assert len(daemon.named("job done", path=str(row.path))) == 1
    assert not list(shared.inbox.rglob(TEMP_OUTPUT_GLOB))
    daemon.check_alive("at the end of the module")
