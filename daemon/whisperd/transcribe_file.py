"""One file through the whole path: decode, transcribe, write. Shared by the CLI and the daemon's worker."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from whisperd.atomic import mode_like
from whisperd.audio import AudioDecodeError
from whisperd.engine import Engine, ProgressCallback
from whisperd.options import DecodeOptions
from whisperd.outputs import write_outputs
from whisperd.recording import RecordingGone, open_recording
from whisperd.transcript import Transcript


@dataclass(frozen=True, slots=True)
class FileResult:
    path: Path
    transcript: Transcript
    outputs: dict[str, Path]
    wall_seconds: float

    def summary(self) -> str:
        names = ", ".join(p.name for p in self.outputs.values())
        return (
            f"{self.path}: {self.transcript.duration:.1f} s audio in {self.wall_seconds:.1f} s, "
            f"language {self.transcript.language} -> {names}"
        )


def transcribe_file(engine: Engine, path: Path, options: DecodeOptions, formats: tuple[str, ...], *,
                    inbox_root: Path | None = None, follow_links_outside: bool = False,
                    expected: tuple[int, int] | None = None, progress: ProgressCallback | None = None) -> FileResult:
    """Transcribe `path` and write its outputs beside it.

    The recording is opened once and read through that descriptor (see whisperd.recording): with
    `inbox_root`, a link leading outside the inbox is refused. `expected` is the (size, mtime_ns) the
    job was queued for. Outputs are as readable as the recording at most, and are put in place only
    if the recording is still there, unchanged, when they are ready. `progress` is the engine's
    (a terminal's bar, the worker's reports to the daemon).
    """
    started = time.perf_counter()
    with open_recording(path, inbox_root, follow_links_outside) as recording:
        if expected is not None and (recording.size, recording.mtime_ns) != expected:
            raise RecordingGone(f"{path.name} changed after it was queued; its new version is queued")
        transcript = _transcribe_recording(engine, recording.read_path, path, options, progress)
        outputs = write_outputs(path, transcript, formats, mode=mode_like(recording.mode),
                                before_commit=recording.check_unchanged)
    return FileResult(path, transcript, outputs, time.perf_counter() - started)


def _transcribe_recording(engine: Engine, read_path: Path, path: Path, options: DecodeOptions,
                          progress: ProgressCallback | None) -> Transcript:
    """Decode and transcribe the open recording; errors name the recording, not the descriptor."""
    try:
        transcript = engine.transcribe_path(read_path, options, progress=progress)
    except AudioDecodeError as exc:
        raise AudioDecodeError(path, exc.reason) from exc
    return transcript
