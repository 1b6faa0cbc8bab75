"""Progress: the engine's reports on a real model, the worker's throttle, the daemon's percentage
and ETA, and how `whisperd status` and the terminal show them."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from whisperd.engine import Engine, Progress
from whisperd.engine.pipeline import WindowedEngine
from whisperd.jobstore import SqliteJobStore
from whisperd.options import DecodeOptions
from whisperd.protocol import JobProgress
from whisperd.status import JobProgressEstimate, collect_status, format_eta, format_status, progress_parts
from whisperd.terminal import TranscribeDisplay, segment_line, timestamp
from whisperd.transcript import Segment
from whisperd.vad import SAMPLING_RATE
from whisperd.worker import progress_reporter
from whisperd_support.evaluation.meeting import meeting_path


@pytest.fixture(scope="module")
def meeting_wav() -> Path:
    """A 150 s meeting (several speakers, a minute of room noise)."""
    return meeting_path(seed=3, target_seconds=150.0)


def test_the_engine_reports_growing_positions_up_to_the_duration(ov_int8: WindowedEngine, meeting_wav: Path) -> None:
    # The loaded model in batches of two windows: several batches in 150 s.
    engine = WindowedEngine(ov_int8.backend, ov_int8.settings.with_overrides(batch_size=2), ov_int8.device,
                            ov_int8.detector)
    reports: list[Progress] = []
    result = engine.transcribe_path(meeting_wav, DecodeOptions(language="en"), progress=reports.append)
    positions = [r.position for r in reports]
    assert reports[0] == Progress(0.0, result.duration), "the duration comes first, before any decoding"
    assert positions == sorted(positions) and positions[-1] == result.duration
    assert all(r.duration == result.duration for r in reports)
    assert len({p for p in positions if 0 < p < result.duration}) >= 2, "one report per batch of windows"
    shown = [s.text.strip() for r in reports for s in r.segments]
    assert len(result.segments) > 10
    assert {s.text for s in result.segments} <= set(shown), "every segment is shown as it is decoded"


def test_silence_reports_the_start_and_the_end(ov_int8: Engine) -> None:
    reports: list[Progress] = []
    ov_int8.transcribe(np.zeros(5 * SAMPLING_RATE, dtype=np.float32), DecodeOptions(), progress=reports.append)
    assert reports == [Progress(0.0, 5.0), Progress(5.0, 5.0)]


def test_the_worker_sends_the_first_report_then_at_most_one_per_interval() -> None:
    sent: list[JobProgress] = []
    report = progress_reporter(7, sent.append, interval=3600)
    for position in (0.0, 10.0, 20.0):
        report(Progress(position, 60.0))
    assert sent == [JobProgress(7, 0.0, 60.0)]
    every = progress_reporter(7, sent.append, interval=0)
    every(Progress(10.0, 60.0))
    every(Progress(20.0, 60.0))
    assert [p.position_seconds for p in sent] == [0.0, 10.0, 20.0]


def test_percent_and_eta_from_the_rate_since_the_job_started() -> None:
    estimate = JobProgressEstimate(position_seconds=30.0, duration_seconds=120.0, elapsed_seconds=10.0)
    assert estimate.percent == 25.0 and estimate.eta_seconds == pytest.approx(30.0)  # 3x real time, 90 s left
    assert estimate.to_dict() == {"percent": 25.0, "eta_seconds": 30.0, "position_seconds": 30.0,
                                  "duration_seconds": 120.0}
    assert JobProgressEstimate(0.0, 120.0, 5.0).eta_seconds is None, "no rate before anything is decoded"
    assert JobProgressEstimate(0.0, 0.0, 1.0).percent == 0.0
    assert JobProgressEstimate(130.0, 120.0, 1.0).percent == 100.0


@pytest.mark.parametrize("seconds, text", [(0.2, "1s"), (45, "45s"), (60, "1m00s"), (70.5, "1m11s"),
                                           (3599, "59m59s"), (7500, "2h05m")])
def test_eta_is_short(seconds: float, text: str) -> None:
    assert format_eta(seconds) == text


def test_progress_parts_floor_the_percentage() -> None:
    assert progress_parts({"percent": 99.9, "eta_seconds": 0.4}) == ["99%", "eta 1s"]
    assert progress_parts({"percent": 0.0, "eta_seconds": None}) == ["0%"]


def write_daemon_file(state_dir: Path, pid: int, job_id: int, progress: dict[str, float | None]) -> None:
    (state_dir / "daemon.json").write_text(json.dumps({
        "pid": pid, "updated_at": 1e12, "current_job": {"id": job_id, "path": "x", "progress": progress}}))


def test_status_shows_the_running_jobs_progress_while_its_daemon_lives(tmp_path: Path) -> None:
    with SqliteJobStore(tmp_path / "jobs.sqlite3") as store:
        store.enqueue(tmp_path / "long.wav", 10, 1)
        job = store.claim_next()
    assert job is not None
    progress = JobProgressEstimate(252.0, 600.0, 200.0).to_dict()  # 42%, 1.26x: 4m36s left
    write_daemon_file(tmp_path, os.getpid(), job.id, progress)
    report = collect_status(tmp_path)
    assert report["running"][0]["progress"] == progress
    assert report["daemon"]["current_job"]["progress"]["percent"] == 42.0
    assert f"running: {tmp_path / 'long.wav'} (attempt 1, 42%, eta 4m37s)" in format_status(report)

    write_daemon_file(tmp_path, 999999999, job.id, progress)  # a dead daemon's last word is not news
    report = collect_status(tmp_path)
    assert report["running"][0]["progress"] is None
    assert f"running: {tmp_path / 'long.wav'} (attempt 1)" in format_status(report)


def test_segment_lines() -> None:
    assert timestamp(0.0) == "00:00.000" and timestamp(61.2) == "01:01.200"
    assert timestamp(3725.5) == "1:02:05.500"
    assert segment_line(Segment(61.2, 64.0, " Hello,\nworld. ")) == "[01:01.200 --> 01:04.000] Hello, world."


def test_a_terminal_gets_a_bar_and_verbose_segments_go_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    name = Path("[red]talk\n.wav")  # shown as it is: neither markup nor a line break
    with TranscribeDisplay(verbose=True, console=console) as display, display.file(name) as update:
        update(Progress(0.0, 120.0))
        update(Progress(60.0, 120.0, (Segment(1.0, 2.5, " Hi there."),)))
        update(Progress(120.0, 120.0))
    drawn = screen.getvalue()
    assert "[red]talk\\n.wav" in drawn and "100%" in drawn and "2:00 / 2:00" in drawn and "\x1b[" in drawn
    assert capsys.readouterr().out == "[00:01.000 --> 00:02.500] Hi there.\n"


def test_with_several_files_each_segment_names_its_file(capsys: pytest.CaptureFixture[str]) -> None:
    with TranscribeDisplay(verbose=True, console=Console(file=io.StringIO()), name_segments=True) as display, \
            display.file(Path("/in/b.wav")) as b, display.file(Path("/in/a.wav")) as a:
        b(Progress(30.0, 60.0, (Segment(1.0, 2.0, "Second."),)))
        a(Progress(30.0, 60.0, (Segment(0.5, 1.0, "First."), Segment(1.0, 1.5, " "))))
    assert capsys.readouterr().out == ("b.wav: [00:01.000 --> 00:02.000] Second.\n"
                                       "a.wav: [00:00.500 --> 00:01.000] First.\n")


def test_no_terminal_no_bar(capsys: pytest.CaptureFixture[str]) -> None:
    screen = io.StringIO()
    with TranscribeDisplay(verbose=False, console=Console(file=screen)) as display, \
            display.file(Path("talk.wav")) as update:
        update(Progress(60.0, 120.0, (Segment(1.0, 2.5, "Hi."),)))
    assert screen.getvalue() == "" and capsys.readouterr().out == ""
