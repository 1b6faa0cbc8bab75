"""The worker's job threads: whatever happens in one, the daemon gets a reply for that job.

A job thread that ended without a reply would leave its job `running` until its deadline (by
default minutes to hours). The engine here is a stand-in that fails in the ways a real one can
(an import that fails inside the job, a SystemExit from a library); the pipe, the threads and the
replies are the real ones.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from whisperd.options import DecodeOptions
from whisperd.protocol import JobFailed, JobRequest, Stop
from whisperd.worker import serve_jobs


class FailingEngine:
    """Fails every transcription with `error`; `sharing` fails too when asked to."""

    def __init__(self, error: BaseException, in_sharing: bool = False) -> None:
        self.error, self.in_sharing = error, in_sharing

    @contextmanager
    def sharing(self) -> Iterator[None]:
        if self.in_sharing:
            raise self.error
        yield

    def transcribe_path(self, *args: object, **kwargs: object) -> None:
        raise self.error


def replies_to(engine: object, wav: Path, jobs: int) -> list[object]:
    daemon_end, worker_end = mp.Pipe()
    server = threading.Thread(target=serve_jobs, args=(worker_end, engine), daemon=True)
    server.start()
    for job_id in range(1, jobs + 1):
        daemon_end.send(JobRequest(job_id=job_id, path=wav, options=DecodeOptions(), outputs=("txt",)))
    replies = []
    while len(replies) < jobs:
        assert daemon_end.poll(30), "a job got no reply"
        reply = daemon_end.recv()
        if isinstance(reply, JobFailed):
            replies.append(reply)
    daemon_end.send(Stop())
    server.join(10)
    assert not server.is_alive(), "Stop did not end the worker's loop"
    return sorted(replies, key=lambda r: r.job_id)


def test_a_job_thread_that_fails_outside_the_transcription_still_replies(tmp_path: Path) -> None:
    wav = tmp_path / "talk.wav"
    wav.write_bytes(b"RIFF")
    replies = replies_to(FailingEngine(ModuleNotFoundError("No module named 'srt'"), in_sharing=True), wav, 2)
    assert [r.job_id for r in replies] == [1, 2]  # type: ignore[attr-defined]
    for reply in replies:
        assert isinstance(reply, JobFailed) and not reply.permanent
        assert reply.error == ("internal error in the worker (the job's thread failed): "
                               "ModuleNotFoundError: No module named 'srt'")
        assert "ModuleNotFoundError" in reply.traceback


def test_a_system_exit_inside_a_job_is_reported_not_swallowed(tmp_path: Path) -> None:
    wav = tmp_path / "talk.wav"
    wav.write_bytes(b"RIFF" + bytes(64))
    [reply] = replies_to(FailingEngine(SystemExit(3)), wav, 1)
    assert isinstance(reply, JobFailed) and "SystemExit" in reply.error
