"""Several jobs in the worker at once (`jobs.at_once`), their windows decoded in shared batches.

A real daemon with the transformers backend and its static decoder on the CPU (the engine that
shares batches; on a GPU it is the default). What is checked is what a user of a queue relies on:
each file is recorded on its own, exactly once, with its own outputs; a bad file among them fails
alone; a worker killed with several jobs in it costs each of them one attempt, and each is then
transcribed once.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import srt

from daemon_harness import (
    TEMP_OUTPUT_GLOB,
    clip,
    final_row,
    rows_for,
    running_daemon,
    transcript_error,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MAX_WER = 0.2
CLIPS = {"first.wav": "en_librivox_ss01_0880", "second.wav": "en_librivox_ss01_0930", "third.wav": "en_goforward"}


def batching_config(tmp_path: Path, at_once: int = 3) -> tuple[Path, Path, Path]:
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    config = write_config(tmp_path / "whisperd.yaml", [{"path": "inbox"}], state,
                          engine={"backend": "transformers", "precision": "fp32", "decoder": "static"},
                          jobs={"at_once": at_once})
    return config, inbox, state


def test_queued_jobs_run_side_by_side_and_each_is_recorded_once(tmp_path: Path) -> None:
    config, inbox, state = batching_config(tmp_path)
    for name, clip_id in CLIPS.items():  # queued together at start-up
        shutil.copyfile(clip(clip_id).path, inbox / name)
    bad = inbox / "notes.mp3"
    bad.write_text("minutes of the meeting, not a recording\n" * 30)
    with running_daemon(config, tmp_path / "daemon.log", engine_flags=False) as daemon:
        ready = daemon.wait_event("worker ready")
        assert ready["shares_batches"] is True and ready["decoder"] == "static"
        for name, clip_id in CLIPS.items():
            path = inbox / name
            row = final_row(state, path)
            assert row.state == "done", row.last_error
            assert [r.state for r in rows_for(state, path)] == ["done"]
            wer = transcript_error(clip(clip_id), path.with_suffix(".txt"))
            assert wer <= MAX_WER, f"{name}: WER {wer:.3f}"
            cues = list(srt.parse(path.with_suffix(".srt").read_text(encoding="utf-8")))
            assert cues and " ".join(c.content for c in cues).split() == path.with_suffix(".txt").read_text().split()
            assert row.worker_pid == ready["worker_pid"]
        failed = final_row(state, bad)
        assert failed.state == "failed" and failed.attempts == 1
        assert "not an audio file" in (failed.last_error or "")
        assert bad.with_name("notes.error.txt").is_file() and not bad.with_suffix(".txt").exists()
        # They were in the worker together, not one after another.
        started = daemon.named("job started")
        assert max(event["in_worker"] for event in started) >= 2, [e["in_worker"] for e in started]
        for name in CLIPS:
            daemon.wait_event("job done", 30, path=str(inbox / name))
            assert len(daemon.named("job done", path=str(inbox / name))) == 1
        daemon.check_alive("after the batch")
        assert daemon.named("worker ready") == [ready], "the worker was restarted"
    assert not list(inbox.glob(TEMP_OUTPUT_GLOB))


def test_a_worker_killed_with_several_jobs_in_it_costs_each_one_attempt(tmp_path: Path) -> None:
    config, inbox, state = batching_config(tmp_path)
    with running_daemon(config, tmp_path / "daemon.log", engine_flags=False) as daemon:
        daemon.wait_event("worker ready")
        for name, clip_id in CLIPS.items():
            shutil.copyfile(clip(clip_id).path, inbox / name)
        wait_for(lambda: len(daemon.status_file().get("running_jobs") or []) >= 2, 120,
                 "two jobs in the worker at once", interval=0.05)
        in_worker = {job["path"] for job in daemon.status_file()["running_jobs"]}
        os.kill(daemon.status_file()["worker_pid"], signal.SIGKILL)
        for name, clip_id in CLIPS.items():
            path = inbox / name
            row = final_row(state, path)
            assert [r.state for r in rows_for(state, path)] == ["done"], row.last_error
            if str(path) in in_worker:
                # Killed in it: one crashed attempt, then done by the new worker (alone).
                assert row.attempts == 1 and "worker process died" in (row.last_error or ""), row.last_error
            assert transcript_error(clip(clip_id), path.with_suffix(".txt")) <= MAX_WER
            daemon.wait_event("job done", 30, path=str(path))  # the row is written just before the line
            assert len(daemon.named("job done", path=str(path))) == 1
        retried = [e for e in daemon.named("job started") if e["attempt"] == 2]
        assert retried and all(e["in_worker"] == 1 for e in retried), "a job that failed before runs alone"
        daemon.check_alive("after the worker was killed")
    assert not list(inbox.glob(TEMP_OUTPUT_GLOB))


def test_a_late_job_times_out_and_the_job_beside_it_is_handed_back(tmp_path: Path) -> None:
    from daemon_harness import MODEL, long_recording
    from whisperd.options import DecodeOptions, EngineSettings
    from whisperd.protocol import AttemptOutcome, JobRequest
    from whisperd.supervisor import WorkerSupervisor

    late, beside = tmp_path / "late.wav", tmp_path / "beside.wav"
    shutil.copyfile(long_recording().path, late)  # ten minutes: far longer than its timeout
    shutil.copyfile(clip("en_goforward").path, beside)
    supervisor = WorkerSupervisor(EngineSettings(model=MODEL, backend="transformers", device="cpu", precision="fp32",
                                                 decoder="static"), "json", "warning")
    try:
        supervisor.start()
        options = DecodeOptions(language="en")
        supervisor.submit(JobRequest(job_id=1, path=late, options=options, outputs=("txt",)), timeout=1.0)
        supervisor.submit(JobRequest(job_id=2, path=beside, options=options, outputs=("txt",)), timeout=600.0)
        assert supervisor.in_flight == 2
        outcomes = wait_for(lambda: (o := supervisor.poll()) and o, 60, "the jobs' outcomes")
        assert outcomes[1].kind is AttemptOutcome.TIMEOUT and "1 s timeout" in outcomes[1].error
        assert outcomes[2].kind is AttemptOutcome.INTERRUPTED
        assert outcomes[2].error == "requeued: the worker was restarted because late.wav ran past its timeout"
        assert not supervisor.alive() and supervisor.in_flight == 0
        # The next job starts a new worker and is answered as usual.
        done = supervisor.run_job(JobRequest(job_id=3, path=beside, options=options, outputs=("txt",)), 600.0)
        assert done.kind is AttemptOutcome.DONE, done.error
        assert supervisor.starts == 2
        assert transcript_error(clip("en_goforward"), beside.with_suffix(".txt")) <= MAX_WER
    finally:
        supervisor.stop()
