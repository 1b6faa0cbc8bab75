"""Voice activity: find speech with Silero VAD and cut it into windows of at most 30 s at pauses.

Silence never reaches the model (no text is invented for it), long audio becomes independent
windows that can be decoded in batches, and each window starts at a speech onset, which keeps
subtitle starts in sync.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

SAMPLING_RATE = 16000


@dataclass(frozen=True, slots=True)
class VadOptions:
    """Tuning for speech detection and windowing (seconds unless named otherwise)."""

    # 0.3 rather than Silero's 0.5: quiet or hoarse speakers in meetings score 0.3-0.5 (measured on
    # the MFA 'cold' speaker); the no-speech and log-probability gates catch what noise slips in.
    threshold: float = 0.3
    min_speech_seconds: float = 0.25
    min_silence_seconds: float = 0.1
    speech_pad_seconds: float = 0.2
    max_window_seconds: float = 30.0
    max_merge_gap_seconds: float = 4.0
    # A second of context either side of the speech: tighter windows clip word edges and cost
    # accuracy (meeting WER 0.114 with 0.3 s, 0.059 with 1 s, whisper-base fp32).
    window_pad_seconds: float = 1.0
    # Loud stretches that Silero left out are decoded too (see loud_runs_outside); 0 disables it.
    rescue_db_above_floor: float = 15.0
    rescue_min_loud_seconds: float = 0.3


@dataclass(frozen=True, slots=True)
class Span:
    """A stretch of speech, in samples."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Window:
    """Audio handed to the model in one piece: [start, end) in samples, and the speech inside it."""

    start: int
    end: int
    spans: tuple[Span, ...]

    @property
    def offset_seconds(self) -> float:
        return self.start / SAMPLING_RATE


class SpeechDetector:
    """Silero VAD (ONNX model shipped in the silero-vad wheel; no download), loaded once."""

    def __init__(self, options: VadOptions | None = None) -> None:
        self.options = options or VadOptions()
        self._model = None
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        """Load the model now (at engine start) rather than inside the first job."""
        with self._lock:
            self._load()

    def _load(self):  # noqa: ANN202 - silero's model wrapper has no public type
        if self._model is None:
            self._model = load_silero_onnx()
        return self._model

    def speech_spans(self, audio: np.ndarray) -> list[Span]:
        """Speech found by Silero, plus loud stretches it left out (decoded; the model's gates judge them)."""
        spans = self._detect(audio)
        if self.options.rescue_db_above_floor > 0:
            spans = sorted(spans + loud_runs_outside(audio, spans, self.options), key=lambda s: s.start)
        return spans

    def _detect(self, audio: np.ndarray) -> list[Span]:
        from silero_vad.utils_vad import get_speech_timestamps_from_probs

        opts = self.options
        # Leave room for the window padding so a maximal span still fits in 30 s.
        max_span = opts.max_window_seconds - 2 * opts.window_pad_seconds - 0.1
        with self._lock:
            probs = speech_probabilities(self._load(), audio)
        stamps = get_speech_timestamps_from_probs(
            probs,
            sampling_rate=SAMPLING_RATE,
            threshold=opts.threshold,
            min_speech_duration_ms=int(opts.min_speech_seconds * 1000),
            min_silence_duration_ms=int(opts.min_silence_seconds * 1000),
            speech_pad_ms=int(opts.speech_pad_seconds * 1000),
            max_speech_duration_s=max_span,
            audio_length_samples=len(audio),
        )
        return [Span(int(s["start"]), int(s["end"])) for s in stamps]


VAD_CHUNK = 512  # samples per Silero step at 16 kHz
STREAM_SECONDS = 10.0  # audio per parallel stream
STREAM_WARM_UP_CHUNKS = 160  # ~5 s of audio before a stream's first chunk, to settle its state


def speech_probabilities(model, audio: np.ndarray) -> list[float]:  # noqa: ANN001 - silero's OnnxWrapper
    """Silero's speech probability for every 512-sample chunk, as `get_speech_timestamps` computes it,
    but for many stretches of the file at once.

    Silero is a recurrent model stepped 32 ms at a time, and one ONNX call per step is most of the
    VAD's cost on a long file. The file is cut into 10 s streams run side by side as one batch
    (1.7x faster on the 211 s meeting); each stream first runs over the 5 s before it, so its state
    has settled by its first own chunk. The speech/non-speech decision still differs from a single
    pass on about 0.5 % of the chunks, as much as starting a single pass after one second of
    silence changes it: the model's state never quite forgets (tests/test_vad.py bounds this).
    """
    import torch

    chunks = -(-len(audio) // VAD_CHUNK)
    if chunks == 0:
        return []
    padded = np.zeros((chunks + STREAM_WARM_UP_CHUNKS) * VAD_CHUNK, dtype=np.float32)
    padded[STREAM_WARM_UP_CHUNKS * VAD_CHUNK:STREAM_WARM_UP_CHUNKS * VAD_CHUNK + len(audio)] = audio
    per_stream = max(1, int(STREAM_SECONDS * SAMPLING_RATE) // VAD_CHUNK)
    streams = -(-chunks // per_stream)
    steps = per_stream + STREAM_WARM_UP_CHUNKS
    # Stream b covers chunks [b * per_stream, (b + 1) * per_stream) of the file, preceded by its warm-up.
    grid = np.zeros((streams, steps, VAD_CHUNK), dtype=np.float32)
    for b in range(streams):
        first = b * per_stream  # in `padded` chunk units this is the warm-up start
        piece = padded[first * VAD_CHUNK:(first + steps) * VAD_CHUNK]
        grid[b, :len(piece) // VAD_CHUNK] = piece[: (len(piece) // VAD_CHUNK) * VAD_CHUNK].reshape(-1, VAD_CHUNK)
    model.reset_states(streams)
    out = np.empty((streams, steps), dtype=np.float32)
    for step in range(steps):
        out[:, step] = model(torch.from_numpy(grid[:, step]), SAMPLING_RATE).numpy().reshape(-1)
    # (The first stream warms up on silence: the file's start is judged as after a pause.)
    return out[:, STREAM_WARM_UP_CHUNKS:].reshape(-1)[:chunks].tolist()


FRAME = 320  # 20 ms


def frame_levels_db(audio: np.ndarray) -> np.ndarray:
    n = len(audio) // FRAME
    if n == 0:
        return np.zeros(0)
    frames = audio[: n * FRAME].reshape(n, FRAME).astype(np.float64)
    return 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)


def loud_runs_outside(audio: np.ndarray, spans: list[Span], options: VadOptions) -> list[Span]:
    """Runs of frames well above the room's noise floor that no detected span covers.

    Silero's recurrent state, carried over a long quiet stretch, can miss an odd voice (falsetto,
    a hoarse 'uh' before a sentence) that stands 20 dB above the room. Such runs are handed to the
    model too; its no-speech and log-probability gates drop what is not speech.
    """
    levels = frame_levels_db(audio)
    if len(levels) == 0:
        return []
    floor = float(np.percentile(levels, 10))
    loud = levels > floor + options.rescue_db_above_floor
    for span in spans:
        loud[span.start // FRAME : span.end // FRAME + 1] = False
    min_run = max(1, int(options.rescue_min_loud_seconds * SAMPLING_RATE / FRAME))
    bridge = int(0.3 * SAMPLING_RATE / FRAME)  # short dips between syllables stay in one run
    runs: list[tuple[int, int]] = []
    for index in np.flatnonzero(loud):
        if runs and index - runs[-1][1] <= bridge:
            runs[-1] = (runs[-1][0], int(index) + 1)
        else:
            runs.append((int(index), int(index) + 1))
    pad = int(options.speech_pad_seconds * SAMPLING_RATE)
    return [Span(max(0, a * FRAME - pad), min(len(audio), b * FRAME + pad)) for a, b in runs if b - a >= min_run]


def load_silero_onnx():  # noqa: ANN201
    """Silero's ONNX model. Importing silero_vad calls torch.set_num_threads(1) process-wide, which
    would leave Whisper on one core: the thread count is put back right after the import."""
    import torch

    threads = torch.get_num_threads()
    try:
        from silero_vad import load_silero_vad
    finally:
        torch.set_num_threads(threads)
    return load_silero_vad(onnx=True)


def plan_windows(spans: list[Span], total_samples: int, options: VadOptions | None = None) -> list[Window]:
    """Group consecutive spans into windows of at most `max_window_seconds`.

    A window closes at a pause longer than `max_merge_gap_seconds` (a new speaker turn usually
    starts there, and the window's first timestamp is then the onset) or when the next span
    would not fit. Windows are padded a little on each side, without overlapping each other.
    """
    opts = options or VadOptions()
    max_len = int(opts.max_window_seconds * SAMPLING_RATE)
    max_gap = int(opts.max_merge_gap_seconds * SAMPLING_RATE)
    pad = int(opts.window_pad_seconds * SAMPLING_RATE)
    groups: list[list[Span]] = []
    for span in spans:
        if groups:
            current = groups[-1]
            fits = span.end - current[0].start + 2 * pad <= max_len
            if fits and span.start - current[-1].end <= max_gap:
                current.append(span)
                continue
        groups.append([span])
    windows: list[Window] = []
    for i, group in enumerate(groups):
        lower = windows[-1].end if windows else 0
        upper = groups[i + 1][0].start if i + 1 < len(groups) else total_samples
        start = max(lower, group[0].start - pad)
        end = min(upper, group[-1].end + pad, start + max_len)
        windows.append(Window(start, end, tuple(group)))
    return windows
