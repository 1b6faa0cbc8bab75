"""The backend-independent half of transcription: VAD windows, batching, language choice, guards.

A backend only has to decode a batch of <= 30 s windows (and detect a language); everything that
decides what reaches the model and what comes back out lives here, once, for every backend.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from whisperd.audio import AudioDecodeError, decode_audio, probe_duration, stream_audio
from whisperd.engine.guards import (
    collapse_segment_loops,
    comparable,
    drop_repeats,
    give_time,
    spoken_length,
    text_compression_ratio,
)
from whisperd.engine.shared_batches import SharedBatches
from whisperd.engine.streams import new_stream, on_stream
from whisperd.errors import WhisperdError
from whisperd.languages import AUTO
from whisperd.options import DecodeOptions, EngineSettings
from whisperd.transcript import Repairs, Segment, Transcript
from whisperd.vad import (
    BLOCK_ALIGN,
    BLOCK_SAMPLES,
    SAMPLING_RATE,
    Span,
    SpeechDetector,
    SpeechScan,
    Window,
    plan_windows,
)

T = TypeVar("T")
R = TypeVar("R")

NO_REPAIRS = Repairs()
NO_SPEECH_LANGUAGE = "und"  # ISO 639-2 'undetermined': the file had no speech to detect a language from
# Recordings up to this long keep their samples from the speech scan for decoding (38 MB at
# most); longer ones are decoded from the file a second time, which costs little next to
# transcribing them (Opus decodes at ~400x real time on one core, WAV and FLAC much faster).
KEEP_IN_MEMORY_SECONDS = 10 * 60
#: Recordings transcribed side by side on an engine whose windows share batches (`whisperd
#: transcribe`'s files; the daemon's jobs where the batches are on an accelerator). Enough that their
#: windows fill the batch in flight (128 rows) while each one's last passes run down: the daemon
#: drained a backlog of 32 meetings at 2 600x real time with 8 at once and 4 300x with 32, for 0.4 GB
#: more worker memory (each keeps up to 10 minutes of audio, KEEP_IN_MEMORY_SECONDS).
JOBS_AT_ONCE_SHARED = 32
#: Speech scans (reading a file and finding its speech) run at once. Scans side by side share the
#: cores and the interpreter, and a recording's windows wait for its whole scan: with 32 files
#: scanned at once on 16 cores, none is done before about 0.8 s, and the device idles until then.
SCANS_AT_ONCE = max(2, (os.cpu_count() or 2) // 2)


class TranscriptionError(WhisperdError, RuntimeError):
    """A file could not be transcribed for a reason the user can act on (wrong language for the model...)."""

    permanent = True


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a transcription is, so a terminal or the daemon can show it while a long file runs.

    `position` is the end of the last window decoded in order (seconds from the start of the
    file); it only grows. `segments` are those just decoded, with file times, before the final
    clean-up (`clean_segments`), for showing them as they come.
    """

    position: float
    duration: float
    segments: tuple[Segment, ...] = ()


ProgressCallback = Callable[[Progress], None]


def _no_progress(_: Progress) -> None:
    """The default callback: nobody is watching."""


class WindowBackend(Protocol):
    """What a model runtime provides: decoding of short windows, and language detection."""

    is_multilingual: bool

    def describe(self) -> dict[str, object]: ...

    def detect_language(self, audio: np.ndarray) -> tuple[str, float]: ...

    def decode_windows(self, windows: Sequence[np.ndarray], language: str, options: DecodeOptions) -> list[list[Segment]]:
        """Segments per window, with times relative to the window's start."""
        ...

    def decode_long_form(self, audio: np.ndarray, language: str, options: DecodeOptions) -> list[Segment]:
        """The whole file sequentially, conditioning on previous text (used when VAD is off)."""
        ...


class WindowedEngine:
    """Engine = a backend + VAD windowing + batching + hallucination guards."""

    def __init__(self, backend: WindowBackend, settings: EngineSettings, device: str,
                 detector: SpeechDetector | None = None) -> None:
        self.backend = backend
        self.settings = settings
        self.device = device
        self._scan_slots = threading.BoundedSemaphore(SCANS_AT_ONCE)
        # On CUDA the speech scan runs on the GPU too; elsewhere Silero's ONNX model on the CPU.
        self.detector = detector or SpeechDetector(threads=settings.threads,
                                                   device=device if device.startswith("cuda") else "cpu")
        self.detector.warm_up()

    @property
    def model(self):  # noqa: ANN201 - the backend's model object, for inspection
        return getattr(self.backend, "model", None)

    def describe(self) -> dict[str, object]:
        return {**self.backend.describe(), "batch_size": self.settings.batch_size,
                "shares_batches": self.shares_batches, "jobs_at_once": self.jobs_at_once}

    @property
    def _shared_batches(self) -> SharedBatches[Any, Any] | None:
        return getattr(self.backend, "shared_batches", None)

    @property
    def shares_batches(self) -> bool:
        """Whether transcriptions running side by side have their windows decoded in one batch."""
        return self._shared_batches is not None

    @property
    def jobs_at_once(self) -> int:
        """How many recordings a service should hand this engine at once: several where their
        windows share the accelerator's batches, one where they would only compete for cores."""
        return JOBS_AT_ONCE_SHARED if self.shares_batches and self.device != "cpu" else 1

    @contextlib.contextmanager
    def sharing(self) -> Iterator[None]:
        """Around one transcription that runs beside others (in its own thread): batches wait for
        its windows while it runs, and stop waiting once it ends; on a GPU its own work (speech
        scan, features) goes on a stream of its own (see streams)."""
        batches = self._shared_batches
        with batches.member() if batches is not None else contextlib.nullcontext(), \
                on_stream(new_stream(self.device) if batches is not None else None):
            yield

    def transcribe(self, audio: np.ndarray, options: DecodeOptions, *,
                   progress: ProgressCallback | None = None) -> Transcript:
        """Transcribe samples held in memory (16 kHz mono float32); `progress` hears after the
        speech scan, after each batch and at the end."""
        started = time.perf_counter()
        with self._scan_slot():
            windows = self._windows(audio, options)
        timings = {"vad_seconds": time.perf_counter() - started}
        pieces = (audio[w.start:w.end] for w in windows)
        return self._transcribe_windows(windows, pieces, len(audio), options, timings,
                                        long_form=None if options.vad else audio, progress=progress)

    def transcribe_path(self, path: Path | str, options: DecodeOptions, *, block_samples: int = BLOCK_SAMPLES,
                        keep_seconds: float = KEEP_IN_MEMORY_SECONDS,
                        progress: ProgressCallback | None = None) -> Transcript:
        """Transcribe an audio file with memory bounded by `block_samples`, however long the file.

        Pass 1 decodes the file block by block into the speech scan; pass 2 decodes it again and
        hands each window's samples to the model in order. A recording of up to `keep_seconds`
        keeps its blocks from pass 1 instead, so the common case decodes once. The segments are
        exactly those `transcribe` gives for the decoded samples. With VAD off the backend walks
        the whole file itself, so that case decodes it into memory as `transcribe` needs it.
        """
        path = Path(path)
        if not options.vad:
            return self.transcribe(decode_audio(path), options, progress=progress)
        if block_samples % BLOCK_ALIGN:
            raise ValueError(f"block_samples must be a multiple of {BLOCK_ALIGN}")
        started = time.perf_counter()
        with self._scan_slot():
            scan, kept = self._scan(path, block_samples, keep_seconds)
            windows = plan_windows(scan.spans(), scan.samples, self.detector.options)
        timings = {"vad_seconds": time.perf_counter() - started}  # decoding the file included
        blocks = _drain(kept) if kept is not None else _decode_again(path, block_samples, scan.samples)
        return self._transcribe_windows(windows, window_samples(blocks, windows), scan.samples, options, timings,
                                        progress=progress)

    def transcribe_many(self, recordings: Sequence[Path | str | np.ndarray], options: DecodeOptions, *,
                        at_once: int = JOBS_AT_ONCE_SHARED) -> Iterator[Transcript | Exception]:
        """Transcribe several recordings (files, or samples in memory) side by side (see
        `side_by_side`); yields each one's transcript, or the exception that failed it, in order."""

        def one(recording: Path | str | np.ndarray) -> Transcript:
            if isinstance(recording, np.ndarray):
                return self.transcribe(recording, options)
            return self.transcribe_path(recording, options)

        return self.side_by_side(recordings, one, at_once=at_once)

    def side_by_side(self, items: Sequence[T], work: Callable[[T], R], *,
                     at_once: int = JOBS_AT_ONCE_SHARED) -> Iterator[R | Exception]:
        """`work(item)` for each item, `at_once` in threads whose windows the backend decodes in
        shared batches where it can (the static-cache decoder does; others run one at a time).
        Yields each result, or the exception that failed that item alone, in input order."""
        from concurrent.futures import ThreadPoolExecutor

        if not self.shares_batches:
            at_once = 1  # nothing to share: one model call at a time

        def one(item: T) -> R | Exception:
            with self.sharing():
                try:
                    return work(item)
                except Exception as exc:  # one bad file fails alone
                    return exc

        with ThreadPoolExecutor(max_workers=max(1, min(at_once, len(items))), thread_name_prefix="transcribe") as pool:
            yield from pool.map(one, items)

    @contextlib.contextmanager
    def _scan_slot(self) -> Iterator[None]:
        """One of the SCANS_AT_ONCE turns to scan. While a transcription waits for its turn, a batch
        starting from idle does not wait for its rows (see SharedBatches.standing_by)."""
        batches = self._shared_batches
        with batches.standing_by() if batches is not None else contextlib.nullcontext():
            self._scan_slots.acquire()
        try:
            yield
        finally:
            self._scan_slots.release()

    def _scan(self, path: Path, block_samples: int, keep_seconds: float) -> tuple[SpeechScan, list[np.ndarray] | None]:
        """Pass 1: the speech scan, and the blocks if the recording is short enough to keep."""
        scan = self.detector.scan()
        declared = probe_duration(path)
        # A header that says "long" spares holding blocks only to drop them; one that lies is caught below.
        kept: list[np.ndarray] | None = [] if declared is None or declared <= keep_seconds else None
        for block in stream_audio(path, block_samples=block_samples):
            scan.add(block)
            if kept is not None:
                if scan.samples > keep_seconds * SAMPLING_RATE:
                    kept = None  # too long to hold: pass 2 decodes the file again
                else:
                    kept.append(block)
        return scan, kept

    def _transcribe_windows(self, windows: list[Window], pieces: Iterator[np.ndarray], samples: int,
                            options: DecodeOptions, timings: dict[str, float],
                            long_form: np.ndarray | None = None,
                            progress: ProgressCallback | None = None) -> Transcript:
        """Language, then decoding: `pieces` yields each window's samples, in order, once."""
        duration = samples / SAMPLING_RATE
        report = progress or _no_progress
        report(Progress(0.0, duration))  # the duration is known: a bar can be shown from here
        if not windows:
            language = options.language if options.language != AUTO else NO_SPEECH_LANGUAGE
            report(Progress(duration, duration))
            return self._transcript(language, None, [], duration, options, timings)
        embedder = speaker_embedder(options.speakers)
        if embedder is not None:
            pieces = _shown_to(embedder, windows, pieces)
        first = next(pieces)
        language, probability = self._choose_language(first, options.language)
        self._check_task(language, options.task)
        started = time.perf_counter()
        repeats = 0
        if long_form is None:
            segments, repeats = self._decode_windows(
                windows, itertools.chain([first], pieces), language, options,
                lambda position, done: report(Progress(position, duration, done)))
        else:
            for _ in pieces:  # the embedder still sees every window
                pass
            segments = self.backend.decode_long_form(long_form, language, options)
        timings["decode_seconds"] = time.perf_counter() - started
        segments, repairs = clean_segments(segments, duration, options.drop_repeated_segments,
                                           options.compression_ratio_threshold)
        repairs = replace(repairs, repeats_dropped=repeats)
        if embedder is not None:
            started = time.perf_counter()
            segments = label_with(embedder, segments, options.speakers)
            timings["speakers_seconds"] = time.perf_counter() - started
        report(Progress(duration, duration))
        return self._transcript(language, probability, segments, duration, options, timings, repairs)

    def _transcript(self, language: str, probability: float | None, segments: list[Segment], duration: float,
                    options: DecodeOptions, timings: dict[str, float], repairs: Repairs = NO_REPAIRS) -> Transcript:
        settings = {
            **self.describe(),
            "language": options.language,
            "task": options.task,
            "vad": options.vad,
            "word_timestamps": options.word_timestamps,
            "speakers": options.speakers,
            "temperatures": list(options.temperatures),
            "compression_ratio_threshold": options.compression_ratio_threshold,
            "logprob_threshold": options.logprob_threshold,
            "no_speech_threshold": options.no_speech_threshold,
            "initial_prompt": options.initial_prompt,
            **{k: round(v, 3) for k, v in timings.items()},
        }
        return Transcript(language=language, language_probability=probability, segments=tuple(segments),
                          duration=duration, task=options.task, settings=settings, repairs=repairs)

    def _windows(self, audio: np.ndarray, options: DecodeOptions) -> list[Window]:
        if len(audio) == 0:
            return []
        if not options.vad:
            # One pseudo-window: the language is detected on the first 30 s, the file decoded whole.
            return [Window(0, min(len(audio), 30 * SAMPLING_RATE), ())]
        spans = self.detector.speech_spans(audio)
        return plan_windows(spans, len(audio), self.detector.options)

    def _choose_language(self, first: np.ndarray, requested: str) -> tuple[str, float | None]:
        """Detect on the first speech window's samples, never on leading silence or music."""
        if not self.backend.is_multilingual:
            return ("en" if requested == AUTO else requested), None
        if requested != AUTO:
            return requested, None
        return self.backend.detect_language(first)

    def _check_task(self, language: str, task: str) -> None:
        if self.backend.is_multilingual:
            return
        if language != "en":
            raise TranscriptionError(f"model {self.settings.model} is English-only and cannot transcribe {language!r}")
        if task == "translate":
            raise TranscriptionError(f"model {self.settings.model} is English-only and cannot translate")

    def _decode_windows(self, windows: list[Window], pieces: Iterable[np.ndarray], language: str,
                        options: DecodeOptions,
                        decoded_up_to: Callable[[float, tuple[Segment, ...]], None] = lambda *_: None,
                        ) -> tuple[list[Segment], int]:
        """Decode in batches; speech that a window's text skipped is decoded again on its own.

        Whisper sometimes ends a window after its first sentence, or jumps from the first sentence
        to the last and stretches one segment's timestamps over the speech in between; both leave
        VAD speech with no words on it (see `uncovered_speech`). A batch's holes are decoded right
        after it, from its windows' samples, so that only one batch of audio is ever held. Then
        `decoded_up_to` hears the end of the batch's last window and the batch's segments.

        Text at a seam - a stretch decoded again, and each window's first segment - loses what
        repeats the text before it (guards.drop_repeats): a stretch that looked skipped because
        its timestamps collapsed gives back the passage already written. Returns the segments in
        time order and how many seams repeated.
        """
        size = self.settings.batch_size
        # Sorted at the end by start, then by how deep the hole, then by window: the order does
        # not depend on when a hole was decoded. The flag marks a window's first segment.
        out: list[tuple[tuple[float, int, int], Segment, bool]] = []
        repeats = 0
        todo = zip(windows, pieces)
        while batch := list(itertools.islice(todo, size)):
            batch_start = len(out)
            pending = [_Job(window, samples) for window, samples in batch]
            while pending:
                jobs, pending = pending[:size], pending[size:]
                decoded = self.backend.decode_windows([job.samples for job in jobs], language, options)
                for job, segments in zip(jobs, decoded):
                    placed = place_in_window(segments, job.window)
                    if job.retries:
                        placed, dropped = drop_repeats(placed, [True] * len(placed), before=job.written)
                        repeats += dropped
                    out.extend(((seg.start, job.retries, job.window.start), seg, not job.retries and i == 0)
                               for i, seg in enumerate(placed))
                    if job.retries < MAX_RESUMES_PER_WINDOW:
                        written = " ".join([job.written, *(seg.text for seg in placed)]).strip()
                        pending.extend(job.hole(hole, written) for hole in uncovered_speech(job.window, placed))
            done = sorted(out[batch_start:], key=lambda item: item[0])
            decoded_up_to(batch[-1][0].end / SAMPLING_RATE, tuple(seg for _, seg, _ in done))
        out.sort(key=lambda item: item[0])
        segments, dropped = drop_repeats([seg for _, seg, _ in out], [first for _, _, first in out])
        return segments, repeats + dropped


def speaker_embedder(speakers: str) -> Any:
    """A fresh speaker embedder when the rules ask for speakers (`off`: None, and nothing loads)."""
    if speakers == "off":
        return None
    from whisperd.speakers import SpeakerEmbedder

    return SpeakerEmbedder()


def _shown_to(embedder: Any, windows: Sequence[Window], pieces: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """`pieces` unchanged, each window's samples handed to the embedder on the way (streaming: the
    embedder keeps only small voice prints)."""
    for window, samples in zip(windows, pieces):
        embedder.add(samples, window.start, window.spans)
        yield samples


def label_with(embedder: Any, segments: list[Segment], speakers: str) -> list[Segment]:
    """Segments and words with their speaker: `auto` finds how many speak, a number fixes it."""
    from whisperd.speakers import SpeakerModelError, assign_speakers

    try:
        turns = embedder.diarize(None if speakers == "auto" else int(speakers))
    except SpeakerModelError as exc:
        raise TranscriptionError(f"speaker labels are unavailable: {exc}") from exc
    return assign_speakers(segments, turns)


@dataclass(frozen=True, slots=True)
class _Job:
    """A window to decode, with its samples, how many times it was carved out of another, and the
    text already written over the window it was carved from (which its own text must not repeat)."""

    window: Window
    samples: np.ndarray
    retries: int = 0
    written: str = ""

    def hole(self, hole: Window, written: str) -> _Job:
        offset = self.window.start
        return _Job(hole, self.samples[hole.start - offset:hole.end - offset], self.retries + 1, written)


def window_samples(blocks: Iterable[np.ndarray], windows: Sequence[Window]) -> Iterator[np.ndarray]:
    """Each window's samples (a copy), in order, cut from consecutive blocks of the recording.

    Windows are in order and do not overlap, so one pass holds a block at a time and nothing
    handed out keeps a block alive.
    """
    blocks = iter(blocks)
    block = np.zeros(0, dtype=np.float32)
    start = 0  # where `block` starts in the recording
    for window in windows:
        parts = []
        position = window.start
        while position < window.end:
            while start + len(block) <= position:
                start += len(block)
                following = next(blocks, None)
                if following is None:
                    raise EOFError(f"the audio ends at sample {start}, inside window {window}")
                block = following
            stop = min(window.end, start + len(block))
            parts.append(block[position - start:stop - start])
            position = stop
        yield np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def _drain(blocks: list[np.ndarray]) -> Iterator[np.ndarray]:
    """Hand out the blocks, letting each go once handed out."""
    blocks.reverse()
    while blocks:
        yield blocks.pop()


def _decode_again(path: Path, block_samples: int, expected: int) -> Iterator[np.ndarray]:
    """The second pass over a file; it must decode to what the first did."""
    decoded = 0
    try:
        for block in stream_audio(path, block_samples=block_samples, log_damage=False):
            decoded += len(block)
            yield block
    except AudioDecodeError as exc:
        raise AudioDecodeError(path, f"changed while it was being transcribed ({exc.reason})") from exc
    if decoded != expected:
        raise AudioDecodeError(path, "changed while it was being transcribed "
                                     f"({expected / SAMPLING_RATE:.1f} s, then {decoded / SAMPLING_RATE:.1f} s)")


MAX_RESUMES_PER_WINDOW = 3
MIN_UNCOVERED_SPEECH_SECONDS = 1.0
WORD_SLACK_SECONDS = 0.5  # word times are DTW estimates; speech this close to a word counts as covered
# Segment times are coarse too (often whole seconds): speech this close to a segment's edge is its
# own. Without it, a sentence that ends 0.7 s after its segment and the next that starts 0.8 s
# before its own made a "hole" of 1.5 s between them, and the hole was decoded as "Thanks for watching!".
SEGMENT_SLACK_SECONDS = 0.5
HOLE_CONTEXT_SECONDS = 0.5


# Without word times: a segment that holds far more speech than its text can take to say was
# stretched over speech Whisper skipped. Its text is taken to cover only what it would take to say
# at SLOW_CHARS_PER_SECOND (people speak 10-15 characters a second; a CJK character counts as 3).
SLOW_CHARS_PER_SECOND = 5.0
STRETCH_MARGIN_SECONDS = 2.0


def covered_intervals(placed: list[Segment], spans: Sequence[Span] = ()) -> list[tuple[float, float]]:
    """Where the text says someone spoke: each word (with slack), or each segment without words."""
    intervals: list[tuple[float, float]] = []
    for seg in placed:
        if seg.words:
            intervals.extend((w.start - WORD_SLACK_SECONDS, w.end + WORD_SLACK_SECONDS) for w in seg.words)
            continue
        needed = spoken_length(seg.text) / SLOW_CHARS_PER_SECOND
        if speech_seconds(spans, seg.start, seg.end) > needed + STRETCH_MARGIN_SECONDS:
            intervals.append((seg.start - SEGMENT_SLACK_SECONDS, seg.start + needed))
        else:
            intervals.append((seg.start - SEGMENT_SLACK_SECONDS, seg.end + SEGMENT_SLACK_SECONDS))
    intervals.sort()
    merged: list[tuple[float, float]] = []
    for start, end in intervals:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def speech_seconds(spans: Sequence[Span], start: float, end: float) -> float:
    a, b = int(start * SAMPLING_RATE), int(end * SAMPLING_RATE)
    return sum(max(0, min(sp.end, b) - max(sp.start, a)) for sp in spans) / SAMPLING_RATE


def uncovered_speech(window: Window, placed: list[Segment]) -> list[Window]:
    """Stretches of the window's speech that no word (or segment) covers, as windows to decode again.

    Each holds at least MIN_UNCOVERED_SPEECH_SECONDS of speech; it starts where the text before it
    stopped (less a little context) and ends where the text after it starts, so that what was
    transcribed is not transcribed twice. A window with no text at all is left alone: the
    no-speech gate judged it.
    """
    if not placed:
        return []
    covered = [(int(a * SAMPLING_RATE), int(b * SAMPLING_RATE)) for a, b in covered_intervals(placed, window.spans)]
    holes: list[Window] = []
    bounds = [window.start] + [x for c in covered for x in c] + [window.end]
    # Gaps between covered intervals: (previous end, next start) pairs.
    for gap_start, gap_end in zip(bounds[0::2], bounds[1::2]):
        gap_start, gap_end = max(gap_start, window.start), min(gap_end, window.end)
        spans = tuple(Span(max(sp.start, gap_start), min(sp.end, gap_end)) for sp in window.spans
                      if sp.end > gap_start and sp.start < gap_end)
        if sum(sp.end - sp.start for sp in spans) < MIN_UNCOVERED_SPEECH_SECONDS * SAMPLING_RATE:
            continue
        start = max(window.start, gap_start, spans[0].start - int(HOLE_CONTEXT_SECONDS * SAMPLING_RATE))
        holes.append(Window(start, gap_end, spans))
    return holes


def place_in_window(segments: list[Segment], window: Window) -> list[Segment]:
    """Shift window-relative times to the file and pull them onto the window's speech.

    Whisper's timestamps are coarse: a segment often "ends" where the next one starts, across the
    silence between speakers, and may start in the padding before anyone talks. A start that falls
    in silence moves to the next speech onset, an end in silence back to the last speech offset,
    so cues neither appear before the words nor linger through pauses.
    """
    offset = window.offset_seconds
    spans = [(sp.start / SAMPLING_RATE, sp.end / SAMPLING_RATE) for sp in window.spans]
    window_end = window.end / SAMPLING_RATE
    placed = []
    for seg in segments:
        start, end = snap_to_speech(seg.start + offset, min(seg.end + offset, window_end), spans)
        words = tuple(replace(w, start=min(max(w.start + offset, start), end), end=min(max(w.end + offset, start), end))
                      for w in seg.words)
        placed.append(replace(seg, start=start, end=end, words=words))
    return placed


def snap_to_speech(start: float, end: float, spans: list[tuple[float, float]]) -> tuple[float, float]:
    """Move `start` forward out of silence and `end` back out of silence, keeping start <= end."""
    if not spans:
        return start, max(start, end)
    if start < spans[0][0]:
        start = spans[0][0]
    else:
        for (_, prev_end), (next_start, _) in zip(spans, spans[1:]):
            if prev_end <= start < next_start:
                start = next_start
                break
    if end > spans[-1][1]:
        end = spans[-1][1]
    else:
        for (_, prev_end), (next_start, _) in zip(spans, spans[1:]):
            # In the pause, or barely into the next stretch of speech (Whisper ends a segment where
            # the next one begins): end with the speech before the pause.
            if prev_end < end <= next_start + ENDS_INTO_NEXT_SPEECH and start < prev_end:
                end = prev_end
                break
    return start, max(start, end)


ENDS_INTO_NEXT_SPEECH = 0.6  # seconds


def clean_segments(segments: list[Segment], duration: float, drop_repeats: bool,
                   compression_threshold: float | None = None) -> tuple[list[Segment], Repairs]:
    """What reaches the writers: no empty text, no sentence said twice in a row, no loop, times in
    order inside [0, duration] and long enough to say the words (see guards); and what was mended.

    A segment's compression ratio (of its final text) is kept for the .json. The loop guard uses the
    compression-ratio gate of the decode, but never below Whisper's 2.4 (where the gate is off, or
    set lower to make windows fall back sooner): below it, ordinary sentences compress that well.
    """
    threshold = max(compression_threshold or LOOP_GATE, LOOP_GATE)
    kept: list[Segment] = []
    loops = 0
    for seg in segments:
        text = seg.text.strip()
        if not text:
            continue
        if drop_repeats and kept and comparable(text) == comparable(kept[-1].text):
            continue  # the classic loop: the same sentence again and again
        seg, removed = collapse_segment_loops(replace(seg, text=text), threshold)
        loops += removed > 0
        if seg.compression_ratio is None:
            seg = replace(seg, compression_ratio=text_compression_ratio(seg.text))
        kept.append(seg)
    timed, repaired = give_time(kept, duration)
    return timed, Repairs(loops_collapsed=loops, times_repaired=repaired)  # seams are counted where decoded


LOOP_GATE = 2.4  # Whisper's compression-ratio threshold
