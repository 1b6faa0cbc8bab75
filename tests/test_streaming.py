"""Transcribing from a file in blocks gives exactly the transcript of the file decoded into memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from whisperd.audio import decode_audio
from whisperd.engine import Engine
from whisperd.engine.pipeline import window_samples
from whisperd.options import DecodeOptions
from whisperd.vad import BLOCK_ALIGN, Window
from whisperd_support.evaluation.meeting import meeting_path


def test_window_samples_across_blocks() -> None:
    audio = np.arange(1000, dtype=np.float32)
    blocks = [audio[i:i + 128] for i in range(0, 1000, 128)]
    windows = [Window(0, 10, ()), Window(100, 400, ()), Window(400, 400, ()), Window(900, 1000, ())]
    pieces = list(window_samples(iter(blocks), windows))
    for window, piece in zip(windows, pieces, strict=True):
        assert np.array_equal(piece, audio[window.start:window.end])
        assert piece.base is None  # a copy: holding it does not keep a block alive
    with pytest.raises(EOFError):
        list(window_samples(iter(blocks[:3]), [Window(300, 500, ())]))


@pytest.fixture(scope="module")
def meeting_wav() -> Path:
    """A 150 s meeting of real speech from several speakers, with a minute of room noise."""
    return meeting_path(seed=3, target_seconds=150.0)


@pytest.mark.parametrize("words", [False, True], ids=["segments", "words"])
def test_two_pass_transcript_equals_in_memory(ov_int8: Engine, meeting_wav: Path, words: bool) -> None:
    options = DecodeOptions(language="auto", word_timestamps=words)
    expected = ov_int8.transcribe(decode_audio(meeting_wav), options)
    # Blocks of ~50 s (four of them) and nothing kept from pass 1: the file is decoded twice.
    streamed = ov_int8.transcribe_path(meeting_wav, options, block_samples=BLOCK_ALIGN, keep_seconds=0)
    kept = ov_int8.transcribe_path(meeting_wav, options, block_samples=BLOCK_ALIGN)
    assert len(expected.segments) > 10 and "vad_seconds" in streamed.settings
    for result in (streamed, kept):
        assert result.segments == expected.segments
        assert (result.language, result.language_probability, result.duration) == \
               (expected.language, expected.language_probability, expected.duration)


def test_two_pass_with_batched_backend(engine_fp32: Engine, meeting_wav: Path) -> None:
    """The transformers backend decodes a batch of windows in one call: the same batches either way.

    Without the temperature fallback, whose sampling draws from torch's global generator and so
    differs from one run to the next whatever the audio.
    """
    options = DecodeOptions(language="en", temperatures=(0.0,))
    expected = engine_fp32.transcribe(decode_audio(meeting_wav), options)
    streamed = engine_fp32.transcribe_path(meeting_wav, options, block_samples=BLOCK_ALIGN, keep_seconds=0)
    assert streamed.segments == expected.segments and streamed.text == expected.text


def test_block_size_must_keep_the_scan_exact(ov_int8: Engine, meeting_wav: Path) -> None:
    with pytest.raises(ValueError, match="multiple"):
        ov_int8.transcribe_path(meeting_wav, DecodeOptions(), block_samples=BLOCK_ALIGN + 1)
