"""Whisper's rules for one decoded 30 s window, on token lists: when to fall back to a higher
temperature, when to skip a window as silence, how timestamp tokens cut it into segments and where
the next pass over the same window starts.

They follow transformers' `WhisperGenerationMixin` (generate_with_fallback, _need_fallback,
_retrieve_segment) so that the static-cache decoder gives the segments `generate()` gives; they are
plain Python on a few hundred integers a window, so they cost nothing next to the model.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

FRAMES_PER_WINDOW = 3000  # log-mel frames in 30 s
INPUT_STRIDE = 2  # log-mel frames per encoder position (the encoder's second convolution)
TIME_PRECISION = 0.02  # seconds per timestamp token
FRAME_SECONDS = 0.01


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The quality gates of one decode (None switches a gate off)."""

    compression_ratio: float | None
    logprob: float | None
    no_speech: float | None


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one decode of a window gave: its generated tokens (with the end-of-text token when the
    model emitted one), their mean log-probability, and the no-speech probability."""

    tokens: tuple[int, ...]
    avg_logprob: float
    no_speech_prob: float


@dataclass(frozen=True, slots=True)
class RawSegment:
    """A segment in seconds from the start of the window, with its tokens (timestamps included)."""

    start: float
    end: float
    tokens: tuple[int, ...]


def compression_ratio(tokens: Sequence[int], vocab_size: int) -> float:
    """Bytes of the tokens over bytes zlib makes of them: loops of repeated text compress well."""
    width = int(math.log2(vocab_size) / 8) + 1
    raw = b"".join(int(t).to_bytes(width, "little") for t in tokens)
    return len(raw) / len(zlib.compress(raw))


def judge(attempt: Attempt, thresholds: Thresholds, vocab_size: int) -> tuple[bool, bool]:
    """(needs a higher temperature, is silence to skip), as transformers decides them."""
    needs_fallback = False
    if thresholds.compression_ratio is not None and attempt.tokens:
        needs_fallback = compression_ratio(attempt.tokens, vocab_size) > thresholds.compression_ratio
    low_logprob = thresholds.logprob is not None and attempt.avg_logprob < thresholds.logprob
    if low_logprob:
        needs_fallback = True
    if thresholds.no_speech is not None and low_logprob and attempt.no_speech_prob > thresholds.no_speech:
        return False, True
    return needs_fallback, False


def split_segments(tokens: Sequence[int], seek: int, timestamp_begin: int) -> tuple[list[RawSegment], int]:
    """Cut one decode (end-of-text removed) into segments at timestamp pairs.

    Returns the segments, in seconds from the window's start, and how many frames the decode
    consumed: all that was left of the window when it ended on a single timestamp (nothing more
    was said) or had no pair at all, otherwise up to its last complete segment, whose remainder is
    decoded again from there.
    """
    offset = seek * TIME_PRECISION / INPUT_STRIDE  # as transformers computes it, to the last bit
    left = FRAMES_PER_WINDOW - seek
    is_time = [t >= timestamp_begin for t in tokens]
    single_ending = is_time[-2:] == [False, True]
    cuts = [i + 1 for i in range(len(tokens) - 1) if is_time[i] and is_time[i + 1]]
    if not cuts:
        stamps = [t for t in tokens if t >= timestamp_begin]
        # In float32, as transformers computes it from a tensor (an integer either side of a rounding).
        last = int(np.float32(left) * np.float32(FRAME_SECONDS) / np.float32(TIME_PRECISION))
        if stamps and stamps[-1] != timestamp_begin:
            last = stamps[-1] - timestamp_begin
        return [RawSegment(offset, offset + last * TIME_PRECISION, tuple(tokens))], left
    if single_ending:
        cuts.append(len(tokens))
    else:
        cuts[-1] += 1  # keep the closing timestamp in the last complete segment
    segments = []
    previous = 0
    for i, cut in enumerate(cuts):
        piece = tokens[previous:cut]
        end_index = -1 if i < len(cuts) - 1 or single_ending else -2
        segments.append(RawSegment(offset + (piece[0] - timestamp_begin) * TIME_PRECISION,
                                   offset + (piece[end_index] - timestamp_begin) * TIME_PRECISION, tuple(piece)))
        previous = cut
    if single_ending:
        return segments, left
    return segments, (tokens[previous - 2] - timestamp_begin) * INPUT_STRIDE


@dataclass(frozen=True, slots=True)
class Pass:
    """One decode to run: window `window` from frame `seek` on, at temperatures[`attempt`]."""

    window: int
    seek: int
    attempt: int


def pass_seed(task: Pass) -> int:
    """The seed of a pass's sampling: a recording gives the same transcript on every run, whatever
    was decoded beside it."""
    return zlib.crc32(f"{task.window}:{task.seek}:{task.attempt}".encode())


class PassQueue(Protocol):
    """Where passes are decoded: `submit` hands passes in, `completed` yields each pass with its
    attempt as it is done (submissions made meanwhile included) until none is outstanding."""

    def submit(self, passes: Sequence[Pass]) -> None: ...

    def completed(self) -> Iterator[tuple[Pass, Attempt]]: ...


def decode_passes(count: int, passes: PassQueue, temperatures: Sequence[float], thresholds: Thresholds,
                  timestamp_begin: int, eos: int, vocab_size: int) -> list[list[RawSegment]]:
    """Segments of `count` windows, each window's passes handed on as soon as the last one is back.

    A pass that fails the quality gates is run again at the next temperature; one that ends
    before the window does is followed by a pass from where it stopped. Passes of different
    windows are in flight together, so fallbacks and continuations share batches; a window's own
    passes run one after another, so its segments come in order.
    """
    segments: list[list[RawSegment]] = [[] for _ in range(count)]
    passes.submit([Pass(i, 0, 0) for i in range(count)])
    for task, attempt in passes.completed():
        needs_fallback, skip = judge(attempt, thresholds, vocab_size)
        if needs_fallback and task.attempt + 1 < len(temperatures):
            passes.submit([Pass(task.window, task.seek, task.attempt + 1)])
            continue
        if skip:
            continue
        tokens = attempt.tokens[:-1] if attempt.tokens and attempt.tokens[-1] == eos else attempt.tokens
        found, consumed = split_segments(tokens, task.seek, timestamp_begin)
        segments[task.window].extend(found)
        if consumed > 0 and task.seek + consumed < FRAMES_PER_WINDOW:
            passes.submit([Pass(task.window, task.seek + consumed, 0)])
    return segments
