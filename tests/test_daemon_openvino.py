"""The daemon with `backend: openvino`: a dropped recording comes out as text, end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from daemon_harness import DaemonProcess, clip, final_row, transcript_error, write_config

pytest.importorskip("openvino_genai", reason="the OpenVINO backend's packages (requirements/openvino.txt) are not installed")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_daemon_with_openvino_backend_transcribes_a_dropped_file(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = write_config(tmp_path / "whisperd.yaml", [{"path": "inbox"}], tmp_path / "state",
                          engine={"backend": "openvino", "precision": "int8"})
    daemon = DaemonProcess(config, tmp_path / "daemon.log", precision="int8").start()
    try:
        ready = daemon.wait_ready(timeout=600)  # the first run exports the model to OpenVINO IR
        assert ready.get("backend") == "openvino", ready
        c = clip("en_librivox_ss01_0870")
        target = inbox / "standup.wav"
        shutil.copy(c.path, target)
        row = final_row(tmp_path / "state", target)
        assert row.state == "done", row
        assert transcript_error(c, target.with_suffix(".txt")) <= 0.1
        assert target.with_suffix(".srt").is_file()
    finally:
        daemon.kill_all()
