"""Voice activity: find speech with Silero VAD and cut it into windows of at most 30 s at pauses.

Silence never reaches the model (no text is invented for it), long audio becomes independent
windows that can be decoded in batches, and each window starts at a speech onset, which keeps
subtitle starts in sync.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from whisperd.silero import SileroOnnx, speech_timestamps
from whisperd.silero_torch import SileroTorch
from whisperd.transcript import SAMPLING_RATE


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

    def __init__(self, options: VadOptions | None = None, threads: int | None = None, device: str = "cpu") -> None:
        self.options = options or VadOptions()
        # On a GPU the whole scan of a block is a few kernels (whisperd.silero_torch); one model
        # serves every caller, since it keeps no state between calls.
        self._on_device = SileroTorch(device) if device != "cpu" else None
        # Streams are independent, so several model instances step different ones side by side
        # (each on one core; the probabilities are the same as with one).
        self.threads = max(1, min(threads or os.cpu_count() or 1, MAX_VAD_THREADS))
        # Model sets not in use: a model keeps the state of the streams it steps, so each caller
        # borrows a whole set, and recordings transcribed side by side scan side by side.
        self._idle: list[list[SileroOnnx]] = []
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        """Load the model now (at engine start) rather than inside the first job."""
        if self._on_device is not None:
            self.probabilities(np.zeros(BLOCK_ALIGN, dtype=np.float32))  # kernels chosen, cuDNN ready
            return
        with self._borrowed():
            pass

    @contextlib.contextmanager
    def _borrowed(self) -> Iterator[list[SileroOnnx]]:
        with self._lock:
            models = self._idle.pop() if self._idle else None
        if models is None:
            models = [load_silero_onnx() for _ in range(self.threads)]
        try:
            yield models
        finally:
            with self._lock:
                self._idle.append(models)

    def speech_spans(self, audio: np.ndarray) -> list[Span]:
        """Speech found by Silero, plus loud stretches it left out (decoded; the model's gates judge them)."""
        scan = self.scan()
        for start in range(0, len(audio), BLOCK_SAMPLES):
            scan.add(audio[start : start + BLOCK_SAMPLES])
        return scan.spans()

    def scan(self) -> SpeechScan:
        """A scan to feed a recording block by block (see SpeechScan)."""
        return SpeechScan(self)

    def probabilities(self, audio: np.ndarray, before: np.ndarray | None = None) -> np.ndarray:
        """speech_probabilities with a set of this detector's models that no other caller is using."""
        if self._on_device is not None:
            return speech_probabilities(self._on_device, audio, before)
        with self._borrowed() as models:
            return speech_probabilities(models, audio, before)


class SpeechScan:
    """Speech detection over a recording that arrives in blocks, so that it is never all in memory.

    Only what the decision needs is kept: a speech probability per 32 ms and a level per 20 ms
    (about 20 MB for ten hours). Every block but the last must be a multiple of BLOCK_ALIGN
    samples long; the probabilities and levels are then exactly those of a scan of the whole
    file, and so are the spans, which are worked out once at the end because the rescue of loud
    runs compares against the noise floor of the whole recording.
    """

    def __init__(self, detector: SpeechDetector) -> None:
        self.detector = detector
        self.samples = 0
        self._probs: list[np.ndarray] = []
        self._levels: list[np.ndarray] = []
        self._tail = np.zeros(0, dtype=np.float32)  # the end of the last block: the next one's warm-up

    def add(self, block: np.ndarray) -> None:
        if self.samples % BLOCK_ALIGN:
            raise ValueError(f"only the last block may be shorter than a multiple of {BLOCK_ALIGN} samples")
        self._probs.append(self.detector.probabilities(block, self._tail))
        self._levels.append(frame_levels_db(block))
        self._tail = block[-STREAM_WARM_UP_CHUNKS * VAD_CHUNK :].copy()
        self.samples += len(block)

    def spans(self) -> list[Span]:
        """Speech found by Silero, plus loud stretches it left out (decoded; the model's gates judge them)."""
        opts = self.detector.options
        # Leave room for the window padding so a maximal span still fits in 30 s.
        max_span = opts.max_window_seconds - 2 * opts.window_pad_seconds - 0.1
        probs = np.concatenate(self._probs) if self._probs else np.zeros(0, dtype=np.float32)
        self._probs = [probs]  # one copy, not two, while the spans are worked out
        stamps = speech_timestamps(
            # It only iterates; Python floats, as a float32 would meet the threshold in float32, and
            # made one at a time, as a list of them would be 8 times the array (36 MB for 10 hours).
            (float(p) for p in probs),
            threshold=opts.threshold,
            min_speech_duration_ms=int(opts.min_speech_seconds * 1000),
            min_silence_duration_ms=int(opts.min_silence_seconds * 1000),
            speech_pad_ms=int(opts.speech_pad_seconds * 1000),
            max_speech_duration_s=max_span,
            audio_length_samples=self.samples,
        )
        spans = [Span(int(s["start"]), int(s["end"])) for s in stamps]
        if opts.rescue_db_above_floor > 0:
            levels = np.concatenate(self._levels) if self._levels else np.zeros(0)
            self._levels = [levels]
            spans = sorted(spans + loud_runs_outside(levels, self.samples, spans, opts), key=lambda s: s.start)
        return spans


# Streams stepped side by side, one core each: on a GPU machine the scan is most of a file's time.
MAX_VAD_THREADS = 16
VAD_CHUNK = 512  # samples per Silero step at 16 kHz
STREAM_SECONDS = 10.0  # audio per parallel stream
STREAM_CHUNKS = int(STREAM_SECONDS * SAMPLING_RATE) // VAD_CHUNK
STREAM_WARM_UP_CHUNKS = 160  # ~5 s of audio before a stream's first chunk, to settle its state
FRAME = 320  # 20 ms, for levels
# Blocks that start at a multiple of this (whole streams and whole frames; ~50 s) are scanned
# exactly as they would be within the whole file.
BLOCK_ALIGN = math.lcm(STREAM_CHUNKS * VAD_CHUNK, FRAME)
# ~200 s (13 MB): the scan of an hour takes 5% longer than with 10-minute blocks, which would
# hold three times the memory.
BLOCK_SAMPLES = 4 * BLOCK_ALIGN


def speech_probabilities(model: SileroOnnx | Sequence[SileroOnnx] | SileroTorch, audio: np.ndarray,
                         before: np.ndarray | None = None) -> np.ndarray:
    """Silero's speech probability for every 512-sample chunk, as `get_speech_timestamps` computes it,
    but for many stretches of the file at once (`model`: whisperd.silero.SileroOnnx).

    Silero is a recurrent model stepped 32 ms at a time, and one ONNX call per step is most of the
    VAD's cost on a long file. The file is cut into 10 s streams run side by side as one batch
    (1.7x faster on the 211 s meeting); each stream first runs over the 5 s before it, so its state
    has settled by its first own chunk. The speech/non-speech decision still differs from a single
    pass on about 0.5 % of the chunks, as much as starting a single pass after one second of
    silence changes it: the model's state never quite forgets (tests/test_vad.py bounds this).

    `before` is the audio that precedes `audio` in the file (its last 5 s are the first streams'
    warm-up; without it they warm up on silence, as the start of a file does). For audio that
    starts at a multiple of STREAM_CHUNKS chunks, this gives exactly the probabilities of a call
    on the whole file: every stream sees the same samples either way.
    """
    chunks = -(-len(audio) // VAD_CHUNK)
    if chunks == 0:
        return np.zeros(0, dtype=np.float32)
    streams = -(-chunks // STREAM_CHUNKS)
    steps = STREAM_CHUNKS + STREAM_WARM_UP_CHUNKS
    warm_up = STREAM_WARM_UP_CHUNKS * VAD_CHUNK
    # The warm-up, the audio, and silence up to a whole number of streams, as rows of one chunk.
    padded = np.zeros(warm_up + streams * STREAM_CHUNKS * VAD_CHUNK, dtype=np.float32)
    if before is not None and len(before):
        tail = before[-warm_up:]
        padded[warm_up - len(tail) : warm_up] = tail
    padded[warm_up : warm_up + len(audio)] = audio
    rows = padded.reshape(-1, VAD_CHUNK)
    if isinstance(model, SileroTorch):  # every stream's chunks at once (see whisperd.silero_torch)
        index = np.arange(streams)[:, None] * STREAM_CHUNKS + np.arange(steps)[None, :]
        return model(rows[index])[:, STREAM_WARM_UP_CHUNKS:].reshape(-1)[:chunks]
    out = np.empty((streams, steps), dtype=np.float32)
    models = [model] if isinstance(model, SileroOnnx) else list(model)
    # Stream b covers chunks [b * STREAM_CHUNKS, (b + 1) * STREAM_CHUNKS) of the audio, after its
    # warm-up: its step-th input is row b * STREAM_CHUNKS + step. Each model steps a share of them.
    share = -(-streams // len(models))
    shares = [range(first, min(streams, first + share)) for first in range(0, streams, share)]

    def run(share: range, silero: SileroOnnx) -> None:
        silero.reset_states(len(share))
        first = share.start * STREAM_CHUNKS
        for step in range(steps):
            batch = rows[first + step : first + step + len(share) * STREAM_CHUNKS : STREAM_CHUNKS]
            out[share.start : share.stop, step] = silero(np.ascontiguousarray(batch))

    if len(shares) == 1:
        run(shares[0], models[0])
    else:
        with ThreadPoolExecutor(len(shares)) as pool:
            list(pool.map(run, shares, models))
    return out[:, STREAM_WARM_UP_CHUNKS:].reshape(-1)[:chunks]


_LEVEL_FRAMES = 1024  # frames per float64 slice in frame_levels_db (2.6 MB)


def frame_levels_db(audio: np.ndarray) -> np.ndarray:
    """Mean power of each whole 20 ms frame, in dB (float64).

    Worked out a slice at a time: a float64 copy of a long recording would be twice its size.
    Each frame's value depends on its own samples only, so slicing changes nothing.
    """
    n = len(audio) // FRAME
    levels = np.empty(n)
    for first in range(0, n, _LEVEL_FRAMES):
        last = min(n, first + _LEVEL_FRAMES)
        frames = audio[first * FRAME : last * FRAME].reshape(last - first, FRAME).astype(np.float64)
        levels[first:last] = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    return levels


def loud_runs_outside(levels: np.ndarray, total_samples: int, spans: list[Span], options: VadOptions) -> list[Span]:
    """Runs of frames well above the room's noise floor that no detected span covers.

    Silero's recurrent state, carried over a long quiet stretch, can miss an odd voice (falsetto,
    a hoarse 'uh' before a sentence) that stands 20 dB above the room. Such runs are handed to the
    model too; its no-speech and log-probability gates drop what is not speech. `levels` are
    frame_levels_db of the whole recording, `total_samples` its length.
    """
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
    return [Span(max(0, a * FRAME - pad), min(total_samples, b * FRAME + pad)) for a, b in runs if b - a >= min_run]


def load_silero_onnx() -> SileroOnnx:
    """Silero's ONNX model from the silero-vad wheel, run without torch (whisperd.silero)."""
    return SileroOnnx()


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
