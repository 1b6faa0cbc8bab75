"""The synthetic meeting (real clips, known boundaries) and the timing/subtitle metrics used on it."""

from __future__ import annotations

import math
from datetime import timedelta

import numpy as np
import pytest
import srt

import whisperd_support.evaluation.meeting as meeting_mod
from whisperd.audio import decode_audio
from whisperd.transcript import Segment, Word
from whisperd_support.evaluation import fetch_clips, load_manifest
from whisperd_support.evaluation.meeting import MEETING_CLIPS, SILENCE_SECONDS, Meeting, build_meeting, speech_bounds
from whisperd_support.evaluation.metrics import (
    Cue,
    as_cue,
    audio_seconds_per_wall_second,
    count_words,
    cue_onset_errors,
    cues_from_srt,
    max_cue_duration,
    max_line_length,
    onset_hits,
    onset_stats,
    real_time_factor,
    words_in_span,
)

SR = 16000


@pytest.fixture(scope="module")
def meeting() -> Meeting:
    return build_meeting(seed=0, use_cache=False)


@pytest.fixture(scope="module")
def long_meeting() -> Meeting:
    return build_meeting(seed=0, target_seconds=600, use_cache=False)


def _dbfs(x: np.ndarray) -> float:
    return 20 * math.log10(float(np.sqrt(np.mean(np.asarray(x, np.float64) ** 2))) + 1e-12)


def _span(audio: np.ndarray, start: float, end: float) -> np.ndarray:
    return audio[int(round(start * SR)) : int(round(end * SR))]


# --- the meeting --------------------------------------------------------------------------


def test_deterministic_for_a_seed(meeting: Meeting) -> None:
    again = build_meeting(seed=0, use_cache=False)
    assert np.array_equal(again.audio, meeting.audio)
    assert again.clips == meeting.clips
    assert again.silence == meeting.silence
    assert again.reference == meeting.reference


def test_other_seed_differs(meeting: Meeting) -> None:
    other = build_meeting(seed=1, use_cache=False)
    assert [c.clip_id for c in other.clips] != [c.clip_id for c in meeting.clips] or other.onsets != meeting.onsets
    assert sorted(c.clip_id for c in other.clips) == sorted(c.clip_id for c in meeting.clips)


def test_shape(meeting: Meeting) -> None:
    assert meeting.sampling_rate == SR
    assert meeting.audio.dtype == np.float32 and meeting.audio.ndim == 1
    assert len(meeting.audio) == round(meeting.duration_s * SR)
    assert float(np.max(np.abs(meeting.audio))) < 1.0
    # on the 16-bit grid, so a saved WAV decodes to the same samples
    assert np.array_equal(np.round(meeting.audio * 32768) / 32768, meeting.audio)
    assert meeting.language == "en"


def test_every_clip_once_and_exclusions(meeting: Meeting) -> None:
    ids = [c.clip_id for c in meeting.clips]
    assert sorted(ids) == sorted(MEETING_CLIPS)
    for excluded in ("en_mfa_mfa_laughter", "en_commonvoice_22058266", "en_mfa_michaelandsickmichael", "en_mfa_whisper"):
        assert excluded not in ids
    assert all(c.clip_id.startswith("en_") for c in meeting.clips)


def test_reference_is_clip_references_in_order(meeting: Meeting) -> None:
    manifest = {s.id: " ".join(s.reference.split()) for s in load_manifest()}
    onsets = [c.onset_s for c in meeting.clips]
    assert onsets == sorted(onsets)
    for c in meeting.clips:
        assert c.reference == manifest[c.clip_id]
        assert c.onset_s < c.offset_s
    assert meeting.reference == " ".join(manifest[c.clip_id] for c in meeting.clips)


def test_pauses_between_clips(meeting: Meeting) -> None:
    gaps = [b.onset_s - a.offset_s for a, b in zip(meeting.clips, meeting.clips[1:])]
    silence_gaps = [g for g in gaps if g > 10.01]
    assert silence_gaps == [pytest.approx(SILENCE_SECONDS + 2.0, abs=1e-3)]
    assert all(1.0 - 1e-3 <= g <= 10.0 + 1e-3 for g in gaps if g <= 10.01)
    assert meeting.clips[0].onset_s >= 0.5
    assert meeting.duration_s - meeting.clips[-1].offset_s == pytest.approx(2.0, abs=1e-3)


def test_silent_stretch_is_where_it_says(meeting: Meeting) -> None:
    s0, s1 = meeting.silence
    assert s1 - s0 == pytest.approx(SILENCE_SECONDS)
    # somewhere in the middle, between two clips, with no clip audio near it
    assert 0.2 * meeting.duration_s < s0 and s1 < 0.8 * meeting.duration_s
    before = [c for c in meeting.clips if c.offset_s <= s0]
    after = [c for c in meeting.clips if c.onset_s >= s1]
    assert len(before) + len(after) == len(meeting.clips) and before and after
    assert s0 - before[-1].offset_s == pytest.approx(1.0, abs=1e-3)
    assert after[0].onset_s - s1 == pytest.approx(1.0, abs=1e-3)
    # only the room noise: -48 dBFS, and no second in it louder than that by 3 dB
    quiet = _span(meeting.audio, s0, s1)
    assert _dbfs(quiet) == pytest.approx(-48.0, abs=1.0)
    assert max(_dbfs(quiet[i : i + SR]) for i in range(0, len(quiet) - SR + 1, SR)) < -45.0


def test_noise_everywhere_no_digital_silence(meeting: Meeting) -> None:
    frames = meeting.audio[: len(meeting.audio) // 1600 * 1600].reshape(-1, 1600)
    assert (np.abs(frames).max(axis=1) > 0).all()


def test_clip_levels_are_similar(meeting: Meeting) -> None:
    levels = {c.clip_id: _dbfs(_span(meeting.audio, c.onset_s, c.offset_s)) for c in meeting.clips}
    # speech level = median frame energy at -28 dBFS; span RMS also counts pauses and loud bursts
    assert all(-33.0 < v < -20.0 for v in levels.values()), levels


def test_onsets_match_the_clip_placement(meeting: Meeting) -> None:
    """Each clip's own speech, re-found by correlation, sits exactly at its stated onset."""
    audio_by_id = {c.id: decode_audio(c.path) for c in fetch_clips(MEETING_CLIPS)}
    for placed in meeting.clips:
        clip = audio_by_id[placed.clip_id]
        first, last, _ = speech_bounds(clip)
        speech = clip[first:last].astype(np.float64)
        assert placed.offset_s - placed.onset_s == pytest.approx(len(speech) / SR, abs=1e-3)
        start = int(round(placed.onset_s * SR))

        def corr(shift: int, start: int = start, speech: np.ndarray = speech) -> float:
            seg = meeting.audio[start + shift : start + shift + len(speech)].astype(np.float64)
            return float(np.corrcoef(seg, speech)[0, 1])

        at = corr(0)
        assert at > 0.95, (placed.clip_id, at)
        for shift in (-SR // 4, SR // 4):
            assert corr(shift) < at - 0.2, placed.clip_id
        # and there is speech energy just after the onset, well over the room noise
        assert _dbfs(_span(meeting.audio, placed.onset_s, placed.onset_s + 0.3)) > -42.0


def test_save_and_load_round_trip(meeting: Meeting, tmp_path) -> None:
    wav = meeting.save(tmp_path / "m.wav")
    assert wav.is_file() and wav.with_suffix(".json").is_file()
    loaded = Meeting.load(wav)
    assert np.array_equal(loaded.audio, meeting.audio)
    assert loaded.clips == meeting.clips
    assert loaded.silence == meeting.silence
    assert loaded.reference == meeting.reference
    assert loaded.duration_s == meeting.duration_s
    assert loaded.params == meeting.params
    # what the daemon would read from that file is the same audio
    assert np.array_equal(decode_audio(wav), meeting.audio)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_cache_is_reused_and_keyed_by_parameters(meeting: Meeting, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(meeting_mod, "meeting_cache_dir", lambda: tmp_path)
    first = build_meeting(seed=0)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and {p.rsplit(".", 1)[1] for p in files} == {"wav", "json"}
    assert np.array_equal(first.audio, meeting.audio)
    wav = tmp_path / files[1]
    mtime = wav.stat().st_mtime_ns
    again = build_meeting(seed=0)
    assert wav.stat().st_mtime_ns == mtime  # read, not rebuilt
    assert np.array_equal(again.audio, meeting.audio) and again.clips == meeting.clips
    build_meeting(seed=0, noise_dbfs=-45.0)
    assert len(list(tmp_path.glob("*.wav"))) == 2
    assert meeting_mod.meeting_path(seed=0) == wav


def test_ten_minute_variant(long_meeting: Meeting) -> None:
    m = long_meeting
    assert m.duration_s == 600.0 and len(m.audio) == 600 * SR
    ids = [c.clip_id for c in m.clips]
    assert len(ids) > 2 * len(MEETING_CLIPS)
    assert set(ids) == set(MEETING_CLIPS)
    assert all(a != b for a, b in zip(ids, ids[1:]))  # never the same clip twice in a row
    s0, s1 = m.silence
    assert s1 - s0 == pytest.approx(SILENCE_SECONDS)
    assert 200 < s0 < 400
    assert not [c for c in m.clips if c.onset_s < s1 + 1.0 - 1e-3 and c.offset_s > s0 - 1.0 + 1e-3]
    assert m.clips[-1].offset_s <= 598.0 + 1e-3
    assert m.reference == " ".join(c.reference for c in m.clips)
    gaps = [b.onset_s - a.offset_s for a, b in zip(m.clips, m.clips[1:])]
    assert sum(g > 10.01 for g in gaps) == 1


def test_ten_minute_variant_is_deterministic(long_meeting: Meeting) -> None:
    again = build_meeting(seed=0, target_seconds=600, use_cache=False)
    assert np.array_equal(again.audio, long_meeting.audio) and again.clips == long_meeting.clips


def test_bad_parameters() -> None:
    with pytest.raises(KeyError):
        build_meeting(clip_ids=["no_such_clip"], use_cache=False)
    with pytest.raises(ValueError):
        build_meeting(pause_range=(0.1, 2.0), use_cache=False)
    with pytest.raises(ValueError):
        build_meeting(target_seconds=65, use_cache=False)


# --- metrics ------------------------------------------------------------------------------


def test_cue_onset_errors_nearest_start() -> None:
    errors = cue_onset_errors([10.0, 0.0, 5.0], [0.2, 4.0, 12.0])
    assert errors == pytest.approx([0.2, 1.0, 2.0])
    assert cue_onset_errors([], [1.0]) == [math.inf]
    assert cue_onset_errors([1.0], []) == []


def test_onset_hits_and_stats() -> None:
    starts, onsets = [0.0, 5.0, 10.0], [0.5, 4.0, 12.0, 10.3]
    assert onset_hits(starts, onsets) == [True, False, False, True]  # 0.5 s is within (inclusive)
    stats = onset_stats(starts, onsets)
    assert stats.errors == pytest.approx([0.5, 1.0, 2.0, 0.3])
    assert stats.median == pytest.approx(0.75)
    assert stats.max == pytest.approx(2.0)
    assert (stats.within, stats.count, stats.tolerance) == (2, 4, 0.5)
    assert onset_stats(starts, onsets, tolerance=1.0).within == 3
    empty = onset_stats(starts, [])
    assert empty.count == 0 and math.isnan(empty.median)


def test_count_words_ignores_punctuation_tokens() -> None:
    assert count_words("Hello, world - it's 10 o'clock ...") == 5
    assert count_words("  ") == 0


def test_words_in_span_even_spread() -> None:
    cues = [
        Cue(0.0, 4.0, "one two three four"),  # 1 s a word: 'four' covers [3, 4]
        Cue(10.0, 12.0, "inside the span"),  # all inside
        Cue(20.0, 24.0, "after it"),  # touches the end: nothing inside
    ]
    assert words_in_span(cues, 3.5, 20.0) == 1 + 3
    assert words_in_span(cues, 4.0, 20.0) == 3  # a word ending exactly at the start does not count
    assert words_in_span(cues, 0.0, 100.0) == 9
    assert words_in_span(cues, 30.0, 40.0) == 0
    assert words_in_span([], 0.0, 1.0) == 0


def test_words_in_span_zero_length_and_punctuation() -> None:
    assert words_in_span([Cue(5.0, 5.0, "a b")], 5.0, 6.0) == 2
    assert words_in_span([Cue(6.0, 6.0, "a b")], 5.0, 6.0) == 0
    assert words_in_span([Cue(5.0, 6.0, "- ...")], 0.0, 10.0) == 0


def test_words_in_span_uses_word_timestamps_when_present() -> None:
    seg = Segment(0.0, 10.0, "early late", words=(Word(0.0, 0.5, "early"), Word(9.0, 9.5, "late")))
    assert words_in_span([seg], 1.0, 9.2) == 1  # an even spread would have said 2
    assert words_in_span([Segment(0.0, 10.0, "early late")], 1.0, 9.2) == 2


def test_as_cue_accepts_segments_subtitles_and_tuples() -> None:
    sub = srt.Subtitle(1, timedelta(seconds=1.5), timedelta(seconds=3), "hi there")
    assert as_cue(sub) == Cue(1.5, 3.0, "hi there")
    assert as_cue(Segment(1.0, 2.0, "x")) == Cue(1.0, 2.0, "x")
    assert as_cue((timedelta(seconds=1), 2, "y")) == Cue(1.0, 2.0, "y")
    with pytest.raises(TypeError):
        as_cue(object())


def test_srt_parsing_and_subtitle_shape() -> None:
    text = srt.compose([
        srt.Subtitle(1, timedelta(seconds=0.5), timedelta(seconds=2.0), "short line"),
        srt.Subtitle(2, timedelta(seconds=3.0), timedelta(seconds=10.25), "a longer first line\nsecond"),
    ])
    cues = cues_from_srt(text)
    assert cues == [Cue(0.5, 2.0, "short line"), Cue(3.0, 10.25, "a longer first line\nsecond")]
    assert max_cue_duration(cues) == pytest.approx(7.25)
    assert max_line_length(cues) == len("a longer first line")
    assert max_cue_duration([]) == 0.0 and max_line_length([]) == 0


def test_speed_helpers() -> None:
    assert real_time_factor(5.0, 100.0) == pytest.approx(0.05)
    assert audio_seconds_per_wall_second(100.0, 5.0) == pytest.approx(20.0)
    assert real_time_factor(1.0, 0.0) == math.inf
    assert audio_seconds_per_wall_second(1.0, 0.0) == math.inf
