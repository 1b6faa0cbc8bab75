"""Speaker diarization on real speech: three people, one of them hoarse and full of "um"s.

The recording is built from dev clips (whisperd_support.evaluation.meeting) so who speaks when is known:
a LibriVox reader, the MFA author (spontaneous speech with fillers, then the same with a cold)
and a Swedish NST speaker, about 90 s in all.  The model and the clips come from PyPI packages.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from whisperd.engine import Engine
from whisperd.options import DecodeOptions
from whisperd.outputs import render
from whisperd.speakers import (
    SpeakerEmbedder,
    SpeakerModelError,
    Turn,
    assign_speakers,
    cluster_embeddings,
    label_speakers,
)
from whisperd.speakers.clustering import absorb_sandwiched, make_turns
from whisperd.speakers.embedding import (
    EmbeddedWindow,
    TorchEncoder,
    default_encoder,
    fbank,
    onnx_encoder,
    window_frames,
)
from whisperd.transcript import Segment, Word
from whisperd.vad import Span, SpeechDetector, plan_windows
from whisperd_support.evaluation.meeting import Meeting, build_meeting

TRIO = ("en_librivox_ss01_0870", "en_librivox_ss01_0890", "en_mfa_acoustic_corpus", "en_mfa_cold_corpus",
        "sv_nst_u0016002", "sv_nst_u0016003")
PERSON = {"en_librivox": "reader", "en_mfa": "mfa-author", "sv_nst": "nst"}


def person(clip_id: str) -> str:
    return next(p for prefix, p in PERSON.items() if clip_id.startswith(prefix))


@pytest.fixture(scope="module")
def trio() -> Meeting:
    return build_meeting(seed=0, clip_ids=TRIO, pause_range=(1.0, 4.0), silence_s=3.0)


@pytest.fixture(scope="module")
def spans(trio: Meeting) -> list[Span]:
    return SpeechDetector().speech_spans(trio.audio)


@pytest.fixture(scope="module")
def embedder(trio: Meeting, spans: list[Span]) -> SpeakerEmbedder:
    """Fed the way the streaming engine reads a file: one VAD window at a time, in order."""
    embedder = SpeakerEmbedder()
    for window in plan_windows(spans, len(trio.audio)):
        embedder.add(trio.audio[window.start:window.end], window.start, window.spans)
    return embedder


def der(meeting: Meeting, turns: list[Turn]) -> float:
    from pyannote.core import Annotation
    from pyannote.core import Segment as Interval
    from pyannote.metrics.diarization import DiarizationErrorRate

    reference, hypothesis = Annotation(), Annotation()
    for clip in meeting.clips:
        reference[Interval(clip.onset_s, clip.offset_s)] = person(clip.clip_id)
    for turn in turns:
        hypothesis[Interval(turn.start, turn.end)] = turn.speaker
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uem approximated by the union of both: intended
        return DiarizationErrorRate(collar=0.5)(reference, hypothesis)  # 0.25 s either side


def test_finds_the_three_speakers_with_a_low_error_rate(trio: Meeting, embedder: SpeakerEmbedder) -> None:
    turns = embedder.diarize()
    assert {t.speaker for t in turns} == {"Speaker 1", "Speaker 2", "Speaker 3"}
    assert der(trio, turns) < 0.08  # 3.2 % when written
    # names by first appearance, turns in time order and inside the recording
    assert turns[0].speaker == "Speaker 1"
    assert all(a.end <= b.start for a, b in zip(turns, turns[1:]))
    assert 0 <= turns[0].start and turns[-1].end <= trio.duration_s
    # the MFA author's speech with a cold is the same person as without one
    author = [c for c in trio.clips if c.clip_id.startswith("en_mfa")]
    labels = {_speaker_at(turns, (c.onset_s + c.offset_s) / 2) for c in author}
    assert len(labels) == 1


def _speaker_at(turns: list[Turn], t: float) -> str:
    return min(turns, key=lambda turn: max(turn.start - t, t - turn.end, 0.0)).speaker


def test_a_given_speaker_count_is_obeyed(trio: Meeting, embedder: SpeakerEmbedder) -> None:
    assert len({t.speaker for t in embedder.diarize(2)}) == 2
    three = embedder.diarize(3)
    assert len({t.speaker for t in three}) == 3 and der(trio, three) < 0.08
    with pytest.raises(ValueError):
        embedder.diarize(0)


def _segments_from_placement(meeting: Meeting) -> list[Segment]:
    """One segment per clip with its reference words spread evenly over the clip's speech."""
    out = []
    for clip in meeting.clips:
        tokens = clip.reference.split()
        step = (clip.offset_s - clip.onset_s) / len(tokens)
        words = tuple(Word(clip.onset_s + i * step, clip.onset_s + (i + 0.9) * step, " " + tok)
                      for i, tok in enumerate(tokens))
        out.append(Segment(clip.onset_s, clip.offset_s, " ".join(tokens), words=words))
    return out


def test_segments_and_words_get_the_speaker_who_said_them(trio: Meeting, spans: list[Span]) -> None:
    segments = _segments_from_placement(trio)
    # Whisper often runs one segment across a change of speaker: join two clips of different people.
    i = max(k for k in range(len(segments) - 1) if person(trio.clips[k].clip_id) != person(trio.clips[k + 1].clip_id))
    a, b = segments[i], segments[i + 1]
    joined = Segment(a.start, b.end, f"{a.text} {b.text}", words=a.words + b.words, avg_logprob=-0.2)
    segments = [*segments[:i], joined, *segments[i + 2:]]

    labelled = label_speakers(segments, trio.audio, spans)
    # the joined segment was cut where the speaker changes, with no text lost
    assert len(labelled) == len(trio.clips)
    assert [s.text for s in labelled] == [c.reference for c in trio.clips]
    assert labelled[i].avg_logprob == labelled[i + 1].avg_logprob == -0.2
    assert labelled[i].end <= labelled[i + 1].start
    assert labelled[0].speaker == "Speaker 1"
    mapping: dict[str, str] = {}
    for seg, clip in zip(labelled, trio.clips, strict=True):
        assert mapping.setdefault(seg.speaker, person(clip.clip_id)) == person(clip.clip_id)
        assert all(w.speaker == seg.speaker for w in seg.words)
    assert len(mapping) == 3


def test_onnx_and_torch_give_the_same_embeddings(trio: Meeting) -> None:
    from whisperd.speakers.campplus import shared_campplus

    feats = fbank(trio.audio[16000 * 9:16000 * 12])[:150]
    feats = (feats - feats.mean(axis=0))[None]
    fast, reference = default_encoder()(feats), TorchEncoder(shared_campplus())(feats)
    cosine = float((fast @ reference.T).item() / np.linalg.norm(fast) / np.linalg.norm(reference))
    assert fast.shape == (1, 192) and cosine > 0.9999


def test_a_damaged_onnx_export_in_the_cache_is_made_again(tmp_path: Path) -> None:
    cache = tmp_path / "models" / "campplus.onnx"
    cache.parent.mkdir()
    cache.write_bytes(b"half a file")
    silence = np.zeros((1, 150, 80), np.float32)
    assert onnx_encoder(cache)(silence).shape == (1, 192)
    assert cache.stat().st_size > 20_000_000  # the export replaced it
    assert np.allclose(onnx_encoder(cache)(silence), default_encoder()(silence), atol=1e-4)


def test_weights_with_another_digest_are_refused(tmp_path: Path) -> None:
    from whisperd.speakers.campplus import load_campplus
    from whisperd.speakers.weights import WEIGHTS_SHA256, weights_path

    with pytest.raises(SpeakerModelError, match=f"have sha256 {WEIGHTS_SHA256}, expected 0{{64}}"):
        load_campplus(weights_path(), sha256="0" * 64)
    fake = tmp_path / "campplus_cn_en_common.pt"
    fake.write_bytes(b"not the model")
    with pytest.raises(SpeakerModelError, match="sha256"):
        load_campplus(fake)
    with pytest.raises(SpeakerModelError, match="not found"):
        load_campplus(tmp_path / "missing.pt")


def test_nothing_is_loaded_until_speech_arrives() -> None:
    code = ("import sys, numpy as np\n"
            "from whisperd.speakers import SpeakerEmbedder, label_speakers\n"
            "from whisperd.transcript import Segment\n"
            "e = SpeakerEmbedder(); e.add(np.zeros(16000, np.float32), 0, [])\n"
            "assert e.diarize() == [] and e.diarize(2) == []\n"
            "segs = [Segment(0.0, 1.0, 'hi')]\n"
            "assert label_speakers(segs, np.zeros(16000, np.float32), []) == segs\n"
            "assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules, 'loaded early'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------- the pieces, on made-up input


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_clustering_finds_the_voices_and_ignores_stray_windows() -> None:
    rng = np.random.default_rng(0)
    voices = _unit(rng.standard_normal((3, 192)))
    rows = [voices[k] + 0.05 * rng.standard_normal(192) for k in (0, 0, 1, 1, 0, 2, 2, 1, 2, 0)]
    rows.append(rng.standard_normal(192))  # one window of something else (a cough)
    labels = cluster_embeddings(_unit(np.array(rows)))
    assert list(labels) == [0, 0, 1, 1, 0, 2, 2, 1, 2, 0, labels[-1]] and labels[-1] in (0, 1, 2)
    assert len(set(cluster_embeddings(_unit(np.array(rows)), 2))) == 2
    assert list(cluster_embeddings(np.zeros((0, 192)))) == []


def test_windows_cover_speech_to_its_end() -> None:
    assert window_frames(40, 150, 75, 50) == []
    assert window_frames(120, 150, 75, 50) == [(0, 120)]
    assert window_frames(400, 150, 75, 50) == [(0, 150), (75, 225), (150, 300), (225, 375), (250, 400)]


def _window(start_s: float, end_s: float) -> EmbeddedWindow:
    return EmbeddedWindow(int(start_s * 16000), int(end_s * 16000), np.zeros(192, np.float32))


def test_turns_follow_the_speech_and_the_nearest_window() -> None:
    speech = [(0, 48000), (52000, 80000), (160000, 168000)]  # 0-3 s, 3.25-5 s, 10-10.5 s
    windows = [_window(0.0, 1.5), _window(0.75, 2.25), _window(1.5, 3.0), _window(3.25, 4.75), _window(3.5, 5.0)]
    turns = make_turns(speech, windows, np.array([1, 1, 0, 0, 0]))
    assert [t.speaker for t in turns] == ["Speaker 1", "Speaker 2", "Speaker 2"]
    assert turns[0].start == 0.0 and turns[1].end == 5.0   # 3.0-3.25 s joined: a short pause
    assert turns[0].end == turns[1].start and 1.8 < turns[0].end < 2.0  # halfway between window centres
    assert (turns[2].start, turns[2].end) == (10.0, 10.5)  # no window of its own: the nearest one's
    assert make_turns([], windows, np.zeros(5, int)) == []
    assert make_turns(speech[:1], [], np.zeros(0, int)) == [Turn(0.0, 3.0, "Speaker 1")]


def test_a_short_stray_cluster_inside_one_speakers_speech_is_absorbed() -> None:
    windows = [_window(0.75 * i, 0.75 * i + 1.5) for i in range(8)] + [_window(20.0, 21.5), _window(20.75, 22.25)]
    labels = np.array([0, 0, 0, 2, 0, 0, 0, 0, 1, 1])
    # the 2 inside speaker 0's speech goes; speaker 1, alone after a pause, stays
    assert list(absorb_sandwiched(windows, labels)) == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    between = np.array([0, 0, 0, 0, 2, 1, 1, 1, 1, 1])  # someone speaking up between two others
    assert list(absorb_sandwiched(windows, between)) == list(between)


def test_words_take_their_own_speaker_and_labels_follow_the_transcript() -> None:
    turns = [Turn(0.0, 2.0, "Speaker 2"), Turn(2.0, 4.0, "Speaker 1"), Turn(6.0, 8.0, "Speaker 2")]
    words = (Word(0.1, 0.5, " Are"), Word(0.5, 1.0, " you"), Word(1.0, 1.9, " ready?"),
             Word(2.1, 2.5, " Yes,"), Word(2.5, 3.0, " let's"), Word(3.0, 3.5, " go."))
    segments = [Segment(0.0, 3.6, " Are you ready? Yes, let's go.", words=words, no_speech_prob=0.1),
                Segment(5.0, 5.5, " Hm."),            # in a pause: the nearest turn
                Segment(6.2, 7.9, " Good.")]          # no words: by overlap
    out = assign_speakers(segments, turns)
    assert [(s.text.strip(), s.speaker) for s in out] == [
        ("Are you ready?", "Speaker 1"), ("Yes, let's go.", "Speaker 2"), ("Hm.", "Speaker 1"), ("Good.", "Speaker 1")]
    assert (out[0].start, out[0].end, out[1].start, out[1].end) == (0.0, 1.9, 2.1, 3.6)
    assert [w.speaker for s in out[:2] for w in s.words] == ["Speaker 1"] * 3 + ["Speaker 2"] * 3
    assert out[1].no_speech_prob == 0.1
    # words that do not spell the text: no cut, the segment goes to most of its words' speaker
    odd = Segment(0.0, 3.6, "Something else entirely", words=words)
    (whole,) = assign_speakers([odd], turns)
    assert whole.text == odd.text and whole.speaker == "Speaker 1" and len(whole.words) == 6
    assert assign_speakers(segments, []) == segments


def test_the_engine_labels_speakers_when_the_rules_ask(trio: Meeting, ov_int8: Engine, tmp_path: Path) -> None:
    """`speakers: auto` through the default engine and the file path (streamed, two passes): every
    segment has one of the three speakers, each person's segments one label, and the outputs say so."""
    import soundfile

    wav = tmp_path / "trio.wav"
    soundfile.write(wav, trio.audio, trio.sampling_rate, subtype="PCM_16")
    plain = ov_int8.transcribe_path(wav, DecodeOptions(language="en"), keep_seconds=0)
    labelled = ov_int8.transcribe_path(wav, DecodeOptions(language="en", speakers="auto"), keep_seconds=0)
    assert [s.text for s in plain.segments] == [s.text for s in labelled.segments]
    assert all(s.speaker is None for s in plain.segments)
    assert {s.speaker for s in labelled.segments} == {"Speaker 1", "Speaker 2", "Speaker 3"}
    by_person: dict[str, set[str | None]] = {}
    for clip in trio.clips:
        for seg in labelled.segments:
            if clip.onset_s - 0.3 <= seg.start <= clip.offset_s:
                by_person.setdefault(person(clip.clip_id), set()).add(seg.speaker)
    assert all(len(labels) == 1 for labels in by_person.values()), by_person
    txt = render(labelled, "txt")
    assert txt.startswith("Speaker 1: ") and txt.count("Speaker ") >= len(trio.clips) - 1
    assert labelled.settings["speakers"] == "auto"
