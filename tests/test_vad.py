"""Speech detection and the re-decoding of speech a window's text skipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from whisperd.engine.pipeline import covered_intervals, uncovered_speech
from whisperd.transcript import Segment, Word
from whisperd.vad import (
    BLOCK_ALIGN,
    SAMPLING_RATE,
    Span,
    SpeechDetector,
    Window,
    frame_levels_db,
    load_silero_onnx,
    speech_probabilities,
)
from whisperd_support.evaluation.meeting import build_meeting

S = SAMPLING_RATE


def single_pass_probabilities(audio: np.ndarray) -> np.ndarray:
    """What silero_vad.get_speech_timestamps computes (the package's own model wrapper): one chunk
    after the other."""
    from silero_vad import load_silero_vad

    model = load_silero_vad(onnx=True)
    model.reset_states()
    samples = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    out = []
    for start in range(0, len(samples), 512):
        chunk = samples[start:start + 512]
        chunk = torch.nn.functional.pad(chunk, (0, 512 - len(chunk)))
        out.append(model(chunk, S).item())
    return np.array(out)


def test_parallel_streams_decide_like_a_single_pass() -> None:
    meeting = build_meeting(seed=0)
    single = single_pass_probabilities(meeting.audio)
    parallel = np.array(speech_probabilities(load_silero_onnx(), meeting.audio))
    assert parallel.shape == single.shape
    flips = np.mean((single > 0.3) != (parallel > 0.3))
    print(f"speech decisions that differ: {100 * flips:.2f} %")
    assert flips < 0.01
    assert np.median(np.abs(single - parallel)) < 0.01


@pytest.mark.parametrize("samples", [0, 100, 512, 513, 16000])
def test_short_audio(samples: int) -> None:
    probs = speech_probabilities(load_silero_onnx(), np.zeros(samples, dtype=np.float32))
    assert len(probs) == -(-samples // 512)
    assert all(p < 0.3 for p in probs)


def test_scan_in_blocks_equals_the_whole_file_exactly() -> None:
    """A long recording is scanned ~10 minutes at a time: nothing may change but the memory used."""
    audio = build_meeting(seed=0).audio  # 211 s: five blocks of BLOCK_ALIGN (~50 s) and a short one
    detector = SpeechDetector()
    whole = speech_probabilities(load_silero_onnx(), audio)
    scan = detector.scan()
    blocks = [audio[start:start + BLOCK_ALIGN] for start in range(0, len(audio), BLOCK_ALIGN)]
    assert len(blocks) >= 4
    for block in blocks:
        scan.add(block.copy())
    assert np.array_equal(np.concatenate(scan._probs), whole)
    levels = np.concatenate(scan._levels)
    frames = audio[: len(audio) // 320 * 320].reshape(-1, 320).astype(np.float64)
    assert np.array_equal(levels, 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12))
    assert np.array_equal(frame_levels_db(audio), levels)
    spans = scan.spans()
    assert len(spans) > 10 and spans == detector.speech_spans(audio)
    # The whole file in one piece, as speech_spans took it before it worked in blocks:
    one = detector.scan()
    one.add(audio)
    assert one.spans() == spans


def test_scan_refuses_a_block_that_would_shift_the_streams() -> None:
    scan = SpeechDetector().scan()
    scan.add(np.zeros(BLOCK_ALIGN - 320, dtype=np.float32))
    with pytest.raises(ValueError, match="multiple"):
        scan.add(np.zeros(BLOCK_ALIGN, dtype=np.float32))


# -- skipped speech -----------------------------------------------------------------------------

WINDOW = Window(0, 30 * S, (Span(0, 3 * S), Span(6 * S, 25 * S)))


def test_segment_stretched_over_skipped_speech_leaves_a_hole() -> None:
    """Whisper wrote the first sentence, then stretched it to 24 s over 19 s of speech it skipped."""
    placed = [Segment(0.0, 24.0, "He might even have been made amiable himself.")]
    holes = uncovered_speech(WINDOW, placed)
    assert len(holes) == 1
    hole = holes[0]
    assert 6 * S - S <= hole.start <= 10 * S and hole.end == WINDOW.end
    assert sum(sp.end - sp.start for sp in hole.spans) >= 14 * S


def test_words_mark_exactly_what_was_said() -> None:
    words = tuple(Word(0.2 + 0.5 * i, 0.65 + 0.5 * i, w) for i, w in enumerate("he might even have been".split()))
    placed = [Segment(0.2, 24.0, "He might even have been", words=words)]
    holes = uncovered_speech(WINDOW, placed)
    assert len(holes) == 1 and holes[0].spans[0].start == 6 * S


def test_fully_covered_window_and_silent_window_are_left_alone() -> None:
    text = "word " * 60  # 300 characters: enough for 22 s of speech
    assert uncovered_speech(WINDOW, [Segment(0.0, 25.0, text)]) == []
    assert uncovered_speech(WINDOW, []) == []  # no text at all: the no-speech gate decided


def test_text_after_a_hole_is_not_decoded_again() -> None:
    placed = [Segment(0.0, 3.0, "Short."), Segment(20.0, 25.0, "And that should be all, thanks to everyone.")]
    holes = uncovered_speech(WINDOW, placed)
    assert len(holes) == 1 and holes[0].end <= 20 * S


def test_wide_characters_count_as_slower_speech() -> None:
    chinese = Segment(0.0, 8.0, "甚至出现交易几乎停止的情况")  # 13 characters say ~3 s of speech
    window = Window(0, 10 * S, (Span(0, 8 * S),))
    assert covered_intervals([chinese], window.spans) == [(-0.5, 8.5)]  # with the segment edges' slack
