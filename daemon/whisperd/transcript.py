"""Typed records that flow from an engine to the writers and the job store."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: The rate every part of whisperd works at: audio is decoded to 16 kHz mono float32 (Whisper's
#: rate), and sample positions (VAD spans, windows, blocks) count samples at this rate.
SAMPLING_RATE = 16000


@dataclass(frozen=True, slots=True)
class Word:
    """One word with its time span in seconds from the start of the file.

    `speaker` is set when speaker labelling ran ("Speaker 1", ...; see whisperd.speakers).
    """

    start: float
    end: float
    text: str
    probability: float | None = None
    speaker: str | None = None


@dataclass(frozen=True, slots=True)
class Segment:
    """A stretch of speech with its text; times are seconds from the start of the file.

    `speaker` is set when speaker labelling ran; its words then carry one each, too.
    """

    start: float
    end: float
    text: str
    words: tuple[Word, ...] = ()
    avg_logprob: float | None = None
    no_speech_prob: float | None = None
    compression_ratio: float | None = None
    speaker: str | None = None
    temperature: float | None = None


@dataclass(frozen=True, slots=True)
class Repairs:
    """How often the engine's guards (whisperd.engine.guards) mended one transcript: phrases
    looped over and over, cut to one copy; text at a seam that repeated the text before it, dropped;
    segments given the time their words take. All zero for a clean decode."""

    loops_collapsed: int = 0
    repeats_dropped: int = 0
    times_repaired: int = 0


@dataclass(frozen=True, slots=True)
class Transcript:
    """What an engine returns for one file."""

    language: str
    segments: tuple[Segment, ...]
    duration: float
    task: str = "transcribe"
    language_probability: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    repairs: Repairs = Repairs()

    @property
    def text(self) -> str:
        return " ".join(s.text.strip() for s in self.segments if s.text.strip())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
