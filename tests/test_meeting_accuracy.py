"""The meeting-grade targets, on the meeting that benchmarks/accuracy.py builds (whisper-base, CPU).

One transcription per precision is shared by the tests below; each asserts one target.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from whisperd.options import DecodeOptions
from whisperd.outputs import render
from whisperd.transcript import Transcript
from whisperd_support.evaluation import error_rate
from whisperd_support.evaluation.meeting import Meeting, build_meeting
from whisperd_support.evaluation.metrics import Cue, cues_from_srt, max_cue_duration, onset_stats, words_in_span

pytestmark = pytest.mark.slow
FILLERS = ("uh", "um", "er", "ah")


@dataclass
class Run:
    transcript: Transcript
    cues: list[Cue]
    wer: float


_RUNS: dict[tuple[str, str, bool, float | None], Run] = {}
# transformers fp32 (the reference) and what a user gets by default (OpenVINO int8), the latter
# also with word timestamps, which move cue edges onto words.
CUE_ENGINES = [("transformers", "fp32", False), ("openvino", "int8", False), ("openvino", "int8", True)]
CUE_IDS = ["transformers-fp32", "openvino-int8", "openvino-int8-words"]


@pytest.fixture(scope="module")
def meeting() -> Meeting:
    return build_meeting(seed=0)


def run(precision: str, meeting: Meeting, backend: str = "transformers", words: bool = False) -> Run:
    key = (backend, precision, words, meeting.params.get("target_seconds"))
    if key not in _RUNS:
        from conftest import load_engine

        engine = load_engine(precision, backend=backend)
        transcript = engine.transcribe(meeting.audio, DecodeOptions(language="en", word_timestamps=words))
        cues = cues_from_srt(render(transcript, "srt"))
        _RUNS[key] = Run(transcript, cues, error_rate([meeting.reference], [transcript.text], "en"))
        print(f"\n{key}: meeting WER {_RUNS[key].wer:.3f}")
    return _RUNS[key]


def test_meeting_wer(meeting: Meeting) -> None:
    assert run("fp32", meeting).wer <= 0.10


def test_sym_int4_meeting_wer_is_within_two_points_of_fp32(meeting: Meeting) -> None:
    """Low-bit weights must not cost more than 0.02 WER (measured: 0.067 against 0.059)."""
    assert run("sym_int4", meeting).wer <= run("fp32", meeting).wer + 0.02


def test_default_engine_on_a_ten_minute_meeting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three rounds of the clips: a window whose text skips most of a 25 s turn and stretches one
    sentence over it must be decoded again. OpenVINO int8 computes in bf16, whose kernels differ
    between CPUs: on a Zen 5 EPYC 0.138 without decoding again, 0.089 with it; on a Zen 4 EPYC 0.164
    and 0.122-0.125. So the win is measured on the machine that runs the test: the same engine with
    decoding again switched off (its real limit set to 0 passes; nothing else changes) is the baseline."""
    import whisperd.engine.pipeline
    from conftest import load_engine

    long_meeting = build_meeting(seed=1, target_seconds=600)
    with_holes = run("int8", long_meeting, backend="openvino").wer
    engine = load_engine("int8", backend="openvino")
    monkeypatch.setattr(whisperd.engine.pipeline, "MAX_RESUMES_PER_WINDOW", 0)
    without = error_rate([long_meeting.reference],
                         [engine.transcribe(long_meeting.audio, DecodeOptions(language="en")).text], "en")
    assert with_holes <= without - 0.03
    assert with_holes <= 0.13


def test_no_words_in_the_silent_minute(meeting: Meeting) -> None:
    start, end = meeting.silence
    assert end - start >= 60
    assert words_in_span(run("fp32", meeting).cues, start, end) == 0


@pytest.mark.parametrize(("backend", "precision", "words"), CUE_ENGINES, ids=CUE_IDS)
def test_every_speaker_turn_has_a_cue_at_its_onset(meeting: Meeting, backend: str, precision: str,
                                                   words: bool) -> None:
    """Within 0.5 s of each clip's first sound. A clip that opens with a filler ('uh') that Whisper
    does not write gets its cue at the first written word: allowed up to 2.5 s late, not early."""
    cues = run(precision, meeting, backend, words).cues
    stats = onset_stats([c.start for c in cues], meeting.onsets)
    for clip, error in zip(meeting.clips, stats.errors):
        opens_with_filler = clip.reference.split()[0].lower() in FILLERS
        limit = 2.5 if opens_with_filler else 0.5
        assert error <= limit, (clip.clip_id, clip.onset_s, error)
    print(f"cue-start error median {stats.median:.2f} s, {stats.within}/{stats.count} within 0.5 s")


@pytest.mark.parametrize(("backend", "precision", "words"), CUE_ENGINES, ids=CUE_IDS)
def test_cues_are_readable(meeting: Meeting, backend: str, precision: str, words: bool) -> None:
    cues = run(precision, meeting, backend, words).cues
    assert max_cue_duration(cues) <= 7.0
    assert all(len(line) <= 42 for c in cues for line in c.text.splitlines())
    assert all(len(c.text.splitlines()) <= 2 for c in cues)
    assert all(a.end <= b.start for a, b in zip(cues, cues[1:]))
    # No cue before speech starts: every cue starts inside (or at the padded edge of) a clip.
    for cue in cues:
        assert any(c.onset_s - 0.5 <= cue.start <= c.offset_s for c in meeting.clips), cue


def test_vtt_parses_with_a_real_library(meeting: Meeting) -> None:
    import webvtt

    captions = webvtt.from_string(render(run("fp32", meeting).transcript, "vtt"))
    assert len(captions) == len(run("fp32", meeting).cues)
