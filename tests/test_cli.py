"""`whisperd transcribe` as a user runs it: a real process, real files, outputs parsed back."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import av
import numpy as np
import pytest
import srt
import webvtt

from whisperd.audio import decode_audio
from whisperd_support.evaluation import DevClip, error_rate


def whisperd(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "whisperd", *args], capture_output=True, text=True, timeout=timeout)


def encode(source: Path, target: Path, codec: str) -> Path:
    """Re-encode at 44.1 kHz stereo (AAC in MP4 is how phones record meetings)."""
    audio = decode_audio(source, sampling_rate=44100)
    stereo = np.ascontiguousarray(np.stack([audio, audio]))
    with av.open(str(target), "w") as container:
        stream = container.add_stream(codec, rate=44100, layout="stereo")
        frame = av.AudioFrame.from_ndarray(stereo, format="fltp", layout="stereo")
        frame.sample_rate = 44100
        for packet in stream.encode(frame):
            container.mux(packet)
        container.mux(stream.encode(None))
    return target


def check_srt(path: Path, duration: float) -> list[srt.Subtitle]:
    cues = list(srt.parse(path.read_text(encoding="utf-8")))
    assert cues, f"{path} has no cues"
    assert [c.index for c in cues] == list(range(1, len(cues) + 1))
    for before, after in zip(cues, cues[1:]):
        assert before.start <= after.start
    for cue in cues:
        assert timedelta(0) <= cue.start <= cue.end <= timedelta(seconds=duration + 0.01)
        assert cue.content.strip()
    return cues


@pytest.mark.parametrize("engine_flags", [[], ["--backend", "transformers", "--precision", "fp32"]],
                         ids=["default-engine", "static-decoder-files-side-by-side"])
def test_transcribe_many_formats_and_bad_files(tmp_path: Path, clip: Callable[[str], DevClip],
                                               engine_flags: list[str]) -> None:
    sources = {
        "reading.wav": clip("en_librivox_ss01_0870"),
        "librispeech.flac": clip("en_librispeech_61-70968-0000"),
        "spanish.opus": clip("es_mls_13697_11991_000000"),
    }
    files: dict[str, tuple[Path, DevClip]] = {}
    for name, c in sources.items():
        target = tmp_path / name
        shutil.copy(c.path, target)
        files[name] = (target, c)
    for name, codec, clip_id in [("meeting.m4a", "aac", "en_librivox_ss01_0890"),
                                 ("interview.mp3", "libmp3lame", "en_librivox_ss01_0920")]:
        files[name] = (encode(clip(clip_id).path, tmp_path / name, codec), clip(clip_id))
    text_as_mp3 = tmp_path / "notes.mp3"
    text_as_mp3.write_text("these are meeting notes, not audio\n")
    empty = tmp_path / "empty.wav"
    empty.touch()

    paths = [str(p) for p, _ in files.values()] + [str(text_as_mp3), str(empty)]
    result = whisperd("transcribe", *paths, "--output-format", "txt,srt,vtt,json", *engine_flags)
    assert result.returncode == 1, result.stderr  # some files failed, the others were still done
    lines = result.stdout.splitlines()
    assert len(lines) == len(paths)
    assert [line.split(":")[0].split(" ", 1)[1] for line in lines] == paths  # one line per file, in order
    assert any(line.startswith("FAILED") and "notes.mp3: not an audio file" in line for line in lines)
    assert any(line.startswith("FAILED") and "empty.wav: empty file" in line for line in lines)
    assert not (tmp_path / "notes.txt").exists() and not (tmp_path / "empty.srt").exists()

    for name, (path, c) in files.items():
        txt = path.with_suffix(".txt").read_text(encoding="utf-8")
        assert error_rate([c.reference], [txt], c.language) <= 0.3, (name, txt)
        check_srt(path.with_suffix(".srt"), c.duration_s)
        vtt = webvtt.read(str(path.with_suffix(".vtt")))
        assert len(vtt.captions) >= 1
        assert path.with_suffix(".json").is_file()
    assert not list(tmp_path.glob(".whisperd-tmp.*")), "temp files left behind"


SEGMENT_LINE = re.compile(r"^\[\d\d:\d\d\.\d{3} --> \d\d:\d\d\.\d{3}\] \S")


def test_verbose_prints_segments_and_a_pipe_gets_no_progress_bar(tmp_path: Path,
                                                                  clip: Callable[[str], DevClip]) -> None:
    first, second = tmp_path / "first.wav", tmp_path / "second.wav"
    shutil.copy(clip("en_librivox_ss01_0870").path, first)
    shutil.copy(clip("en_librivox_ss01_0880").path, second)
    result = whisperd("transcribe", str(first), str(second), "--outputs", "txt", "--verbose")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines if line.startswith("ok ")] == ["ok", "ok"]
    for path in (first, second):
        # Several files may be decoded side by side: each segment line names its file.
        segments = [line.removeprefix(f"{path.name}: ") for line in lines if line.startswith(f"{path.name}: ")]
        assert segments and all(SEGMENT_LINE.match(line) for line in segments), lines
        said = " ".join(line.split("] ", 1)[1] for line in segments)
        assert error_rate([path.with_suffix(".txt").read_text(encoding="utf-8")], [said], "en") < 0.05
    assert len(lines) == 2 + sum(line.startswith(("first.wav: ", "second.wav: ")) for line in lines), lines
    assert "\x1b" not in result.stderr, "no escape codes where stderr is not a terminal"
    assert "model loaded" in result.stderr, "--verbose still logs to stderr"


def run_with_terminal_stderr(*args: str, timeout: float = 600) -> tuple[int, str, str]:
    """`whisperd ARGS` with stderr on a pseudo-terminal (as typed in a shell), stdout piped:
    (exit status, stdout, what the terminal received)."""
    terminal, child_end = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "whisperd", *args], stdout=subprocess.PIPE, stderr=child_end,
                            stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "120"})
    os.close(child_end)
    received = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([terminal], [], [], 0.5)[0]:
            try:
                chunk = os.read(terminal, 65536)
            except OSError:  # EIO: the process closed its end
                break
            if not chunk:
                break
            received += chunk
        elif proc.poll() is not None:
            break
    os.close(terminal)
    assert proc.stdout is not None
    stdout = proc.stdout.read().decode()
    return proc.wait(timeout=30), stdout, received.decode("utf-8", "replace")


def test_a_terminal_gets_a_progress_bar_per_file(tmp_path: Path, clip: Callable[[str], DevClip]) -> None:
    first, second = tmp_path / "first.wav", tmp_path / "second.wav"
    shutil.copy(clip("en_librivox_ss01_0870").path, first)
    shutil.copy(clip("en_goforward").path, second)
    code, stdout, screen = run_with_terminal_stderr("transcribe", str(first), str(second), "--outputs", "txt")
    assert code == 0, screen
    assert [line.split()[0] for line in stdout.splitlines()] == ["ok", "ok"], "results only, on stdout"
    assert "\x1b[" in screen and "first.wav" in screen and "second.wav" in screen
    assert re.search(r"100%.*0:07 / 0:07 +\S*\d+\.\dx", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)), screen


def test_precision_device_mismatch_fails_before_loading(tmp_path: Path, clip: Callable[[str], DevClip]) -> None:
    audio = tmp_path / "a.wav"
    shutil.copy(clip("en_goforward").path, audio)
    started = time.monotonic()
    result = whisperd("transcribe", str(audio), "--device", "cpu", "--precision", "nf4")
    assert result.returncode == 2
    assert "needs an Intel GPU" in result.stderr and "sym_int4" in result.stderr
    assert time.monotonic() - started < 30  # no model was loaded
    assert not audio.with_suffix(".txt").exists()


def test_unknown_language_fails_before_loading(tmp_path: Path) -> None:
    result = whisperd("transcribe", str(tmp_path / "x.wav"), "--language", "klingon")
    assert result.returncode == 2 and "unknown language 'klingon'" in result.stderr


def test_fetch_model_prints_a_transformers_directory() -> None:
    result = whisperd("fetch-model", "openai/whisper-base")
    assert result.returncode == 0, result.stderr
    model_dir = Path(result.stdout.strip())
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()


@pytest.mark.parametrize("fmt", ["txt,doc", ""])
def test_bad_output_format_is_a_usage_error(tmp_path: Path, fmt: str) -> None:
    result = whisperd("transcribe", str(tmp_path / "x.wav"), "--output-format", fmt)
    assert result.returncode == 2 and "output formats" in result.stderr
