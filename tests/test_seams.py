"""Long-form decoding on recordings of pieces played 1.5 s apart (whisperd_support.evaluation.sequences):
no loop, no repeated passage, no segment without time, on both backends (whisper-base, CPU)."""

from __future__ import annotations

import pytest

from whisperd_support.evaluation.sequences import Verdict, build_sequence, judge

pytestmark = pytest.mark.slow

_VERDICTS: dict[tuple[str, str], Verdict] = {}


def verdict(backend: str, name: str) -> Verdict:
    if (backend, name) not in _VERDICTS:
        from conftest import load_engine

        engine = load_engine("int8" if backend == "openvino" else "fp32", backend=backend)
        _VERDICTS[backend, name] = judge(engine, build_sequence(name))
        print(f"\n{backend} {name}: {_VERDICTS[backend, name]}")
    return _VERDICTS[backend, name]


@pytest.mark.parametrize("backend", ["openvino", "transformers"])
@pytest.mark.parametrize("name", ["call-then-prompts", "news-then-readers"])
def test_only_what_was_said(backend: str, name: str) -> None:
    """Held out (call-then-prompts: clips that chose no threshold) and dev (news-then-readers: a
    news excerpt at 8 kHz, then read and spontaneous speech; four segments of 0 s before the guards)."""
    v = verdict(backend, name)
    assert v.loops == 0, v.text
    assert v.repeated == 0, v.text
    assert v.short == 0


@pytest.mark.parametrize("backend", ["openvino", "transformers"])
def test_a_meeting_with_short_pauses_has_no_segment_without_time(backend: str) -> None:
    """The dev meeting's clips 1.5 s apart: a stretched segment ("8 of spades ..." over 27 s) before
    speech decoded again used to push every later segment of the window to its end, 0 s long
    (4 such segments with OpenVINO, 5 with transformers)."""
    from conftest import load_engine
    from whisperd.options import DecodeOptions
    from whisperd_support.evaluation import error_rate
    from whisperd_support.evaluation.meeting import build_meeting
    from whisperd_support.evaluation.metrics import repeated_passages, short_segments, spoken_loops

    meeting = build_meeting(seed=1, pause_range=(1.5, 1.5), silence_s=5.0)
    engine = load_engine("int8" if backend == "openvino" else "fp32", backend=backend)
    transcript = engine.transcribe(meeting.audio, DecodeOptions(language="en"))
    assert short_segments(transcript.segments) == 0
    assert transcript.repairs.times_repaired >= 1
    assert repeated_passages(transcript.text, meeting.reference) == 0
    assert spoken_loops(transcript.text, meeting.reference) == 0
    assert error_rate([meeting.reference], [transcript.text], "en") <= 0.11
