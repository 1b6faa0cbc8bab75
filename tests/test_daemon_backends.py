"""The daemon on each backend: a dropped recording comes out as text, end to end.

`backend: auto` must pick OpenVINO on the CPU (the faster runtime there); `backend: transformers`
is what CUDA and Intel GPUs (ipex-llm) run, exercised here on the CPU in fp32.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess, clip, final_row, transcript_error, write_config

pytest.importorskip("openvino_genai", reason="the OpenVINO backend's packages (requirements/openvino.txt) are not installed")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.mark.parametrize(("backend", "precision", "expected_backend"), [
    ("auto", "auto", "openvino"),
    ("transformers", "fp32", "transformers"),
])
def test_daemon_transcribes_a_dropped_file_on_each_backend(
    tmp_path: Path, backend: str, precision: str, expected_backend: str,
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = write_config(tmp_path / "whisperd.yaml", [{"path": "inbox"}], tmp_path / "state",
                          engine={"backend": backend, "precision": precision})
    daemon = DaemonProcess(config, tmp_path / "daemon.log", precision=precision, backend=backend).start()
    try:
        ready = daemon.wait_ready(timeout=600)  # a first run on OpenVINO exports the model to IR
        assert ready.get("backend") == expected_backend, ready
        c = clip("en_librivox_ss01_0870")
        target = inbox / "standup.wav"
        shutil.copy(c.path, target)
        row = final_row(tmp_path / "state", target)
        assert row.state == "done", row
        assert transcript_error(c, target.with_suffix(".txt")) <= 0.1
        assert target.with_suffix(".srt").is_file()
    finally:
        daemon.kill_all()
