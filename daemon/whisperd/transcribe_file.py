"""One file through the whole path: decode, transcribe, write. Shared by the CLI and the daemon's worker."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from whisperd.audio import decode_audio
from whisperd.engine import Engine
from whisperd.options import DecodeOptions
from whisperd.outputs import write_outputs
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


def transcribe_file(engine: Engine, path: Path, options: DecodeOptions, formats: tuple[str, ...]) -> FileResult:
    started = time.perf_counter()
    audio = decode_audio(path)
    transcript = engine.transcribe(audio, options)
    outputs = write_outputs(path, transcript, formats)
    return FileResult(path, transcript, outputs, time.perf_counter() - started)
