"""The static-cache decoder against transformers' generate(), the same code that runs under CUDA
graphs on a GPU (here eagerly on the CPU), and windows of several recordings in shared batches."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.whisper.generation_whisper import WhisperGenerationMixin

from whisperd.audio import decode_audio
from whisperd.engine import Engine, create_engine
from whisperd.engine.shared_batches import SharedBatches
from whisperd.engine.window_rules import Attempt, Thresholds, decode_passes, judge, split_segments
from whisperd.options import DecodeOptions, EngineSettings
from whisperd_support.evaluation import DevClip, error_rate

TIMESTAMP_BEGIN = 50364
EOS = 50257


@pytest.fixture(scope="module")
def generate_engine() -> Engine:
    return create_engine(EngineSettings(device="cpu", precision="fp32", backend="transformers", decoder="generate"))


def same_segments(a: Engine, b: Engine, audio: np.ndarray, options: DecodeOptions) -> None:
    first, second = a.transcribe(audio, options), b.transcribe(audio, options)
    assert [(s.start, s.end, s.text) for s in first.segments] == [(s.start, s.end, s.text) for s in second.segments]
    assert first.language == second.language


# -- the rules on token lists, against transformers' own -------------------------------------------

tokens = st.lists(st.one_of(st.integers(0, 500), st.integers(TIMESTAMP_BEGIN, TIMESTAMP_BEGIN + 1500)),
                  min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(tokens, st.integers(0, 2999))
def test_segment_cuts_match_transformers(sequence: list[int], seek: int) -> None:
    ours, consumed = split_segments(sequence, seek, TIMESTAMP_BEGIN)
    left = 3000 - seek
    theirs, offset = WhisperGenerationMixin._retrieve_segment(
        seek_sequence=torch.tensor(sequence), seek_outputs=[{}], time_offset=torch.tensor([seek], dtype=torch.float64) * 0.02 / 2,
        timestamp_begin=TIMESTAMP_BEGIN, seek_num_frames=torch.tensor([left]), time_precision=0.02,
        time_precision_features=0.01, input_stride=2, prev_idx=0, idx=0, return_token_timestamps=False,
        decoder_input_ids=torch.zeros(1, 3, dtype=torch.long))
    assert int(offset) == consumed
    assert [tuple(int(t) for t in s["tokens"]) for s in theirs] == [s.tokens for s in ours]
    flat = [float(t) for s in theirs for t in (s["start"], s["end"])]
    assert flat == pytest.approx([t for s in ours for t in (s.start, s.end)])


def test_quality_gates() -> None:
    gates = Thresholds(compression_ratio=2.4, logprob=-1.0, no_speech=0.6)
    varied = tuple(range(100, 140))
    assert judge(Attempt(varied, -0.3, 0.1), gates, 51865) == (False, False)
    assert judge(Attempt(varied, -1.5, 0.1), gates, 51865) == (True, False)  # unsure: a higher temperature
    assert judge(Attempt(varied, -1.5, 0.9), gates, 51865) == (False, True)  # unsure and silent: skipped
    assert judge(Attempt((100, 101) * 40, -0.3, 0.1), gates, 51865) == (True, False)  # a loop compresses well
    assert judge(Attempt((100, 101) * 40, -0.3, 0.1), Thresholds(None, None, None), 51865) == (False, False)


def test_fallback_reruns_only_the_windows_that_failed() -> None:
    """Window 1 fails at temperature 0 and passes at 0.2; window 0 passes at once; both end on a
    single timestamp, so each is decoded in one pass."""
    calls: list[list[tuple[int, int, int]]] = []

    def run(passes):  # noqa: ANN001, ANN202
        calls.append([(p.window, p.seek, p.attempt) for p in passes])
        return [Attempt((TIMESTAMP_BEGIN, 400, TIMESTAMP_BEGIN + 50, EOS),
                        -2.0 if (p.window, p.attempt) == (1, 0) else -0.2, 0.0) for p in passes]

    found = decode_passes(2, run, (0.0, 0.2, 0.4), Thresholds(2.4, -1.0, 0.6), TIMESTAMP_BEGIN, EOS, 51865)
    assert calls == [[(0, 0, 0), (1, 0, 0)], [(1, 0, 1)]]
    assert [[(s.start, s.end) for s in window] for window in found] == [[(0.0, 1.0)], [(0.0, 1.0)]]


# -- the decoder against generate(), on real speech ------------------------------------------------


def test_same_segments_as_generate(engine_fp32: Engine, generate_engine: Engine,
                                   clip: Callable[[str], DevClip]) -> None:
    assert engine_fp32.describe()["decoder"] == "static"
    speech = clip("en_goforward")
    same_segments(engine_fp32, generate_engine, decode_audio(speech.path), DecodeOptions(language="en"))
    same_segments(engine_fp32, generate_engine, decode_audio(speech.path),
                  DecodeOptions(language="en", initial_prompt="Go forward, move ahead."))


@pytest.mark.slow
def test_same_segments_as_generate_on_a_meeting(engine_fp32: Engine, generate_engine: Engine) -> None:
    """Six speakers over 3.5 minutes: many windows, timestamps continued inside windows."""
    from whisperd_support.evaluation.meeting import Meeting, meeting_path

    meeting = Meeting.load(meeting_path(seed=0))
    same_segments(engine_fp32, generate_engine, meeting.audio, DecodeOptions(language="en"))


@pytest.mark.slow
def test_same_segments_as_generate_in_other_languages(engine_fp32: Engine, generate_engine: Engine,
                                                      clip: Callable[[str], DevClip]) -> None:
    """Language detection, then a multilingual prefix; and translation. Greedy only: base is unsure
    of these, and a fallback samples (differently in each implementation)."""
    speech = clip("zh_aishell1_BAC009S0764W0121")
    greedy = {"temperatures": (0.0,)}
    same_segments(engine_fp32, generate_engine, decode_audio(speech.path), DecodeOptions(language="auto", **greedy))
    same_segments(engine_fp32, generate_engine, decode_audio(speech.path),
                  DecodeOptions(language="zh", task="translate", **greedy))


def test_temperature_fallback_is_sampled(engine_fp32: Engine, clip: Callable[[str], DevClip]) -> None:
    """A log-probability gate no decode can pass sends every window through every temperature;
    the last attempt is kept, as in generate()."""
    speech = clip("en_goforward")
    strict = DecodeOptions(language="en", temperatures=(0.0, 0.6, 1.0), logprob_threshold=0.0, no_speech_threshold=None)
    result = engine_fp32.transcribe(decode_audio(speech.path), strict)
    assert result.text.strip()
    greedy = engine_fp32.transcribe(decode_audio(speech.path), DecodeOptions(language="en"))
    assert error_rate([speech.reference], [greedy.text], "en") < 0.1


# -- several recordings in shared batches ----------------------------------------------------------


def test_shared_batches_wait_for_every_member_and_route_results() -> None:
    ran: list[list[int]] = []
    batches: SharedBatches[int, int] = SharedBatches(lambda rows: ran.append(list(rows)) or [r * 10 for r in rows], 100)
    results: dict[int, list[int]] = {}
    entered = threading.Barrier(3)

    def member(first: int) -> None:
        with batches.member():
            entered.wait()
            time.sleep(0.05 * first)  # arrive one after another: the batch waits for the last
            results[first] = batches.decode([first, first + 1])

    threads = [threading.Thread(target=member, args=(n,)) for n in (0, 2, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == {0: [0, 10], 2: [20, 30], 4: [40, 50]}
    assert ran == [[0, 1, 2, 3, 4, 5]]


def test_shared_batches_hand_a_failure_to_each_caller_in_it() -> None:
    def broken(rows: list[int]) -> list[int]:
        raise RuntimeError("device lost")

    with pytest.raises(RuntimeError, match="device lost"):
        SharedBatches(broken, 8).decode([1])


def test_several_recordings_share_batches_and_keep_their_own_transcripts(
        engine_fp32: Engine, clip: Callable[[str], DevClip]) -> None:
    recordings = [decode_audio(clip("en_goforward").path), decode_audio(clip("zh_aishell1_BAC009S0764W0121").path), np.zeros(16000 * 3, dtype=np.float32)]
    alone = [engine_fp32.transcribe(audio, DecodeOptions()) for audio in recordings]
    batches = engine_fp32.backend.shared_batches
    before = batches.batches_run
    together = list(engine_fp32.transcribe_many(recordings, DecodeOptions()))
    assert [t.text for t in together] == [t.text for t in alone]
    assert [t.language for t in together] == [t.language for t in alone]
    # The two speech clips need one window each: with both in flight they share one batch.
    assert batches.batches_run - before < sum(1 for t in alone if t.segments) + 1
