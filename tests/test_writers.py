"""The txt, srt, vtt and json writers: each output parses with the usual tools and says the same thing."""

from __future__ import annotations

import html
import json
from datetime import timedelta
from pathlib import Path

import pytest
import srt
import webvtt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from whisperd.outputs import FORMATS, output_paths, render, write_outputs
from whisperd.outputs.cues import build_cues
from whisperd.outputs.writers import render_json, render_srt, render_txt, render_vtt
from whisperd.transcript import Segment, Transcript, Word

MEETING = (
    Segment(0.0, 4.2, " Okay, so I think everyone is here, so let's get started."),
    Segment(4.2, 11.8, " The first item on the agenda is the quarterly budget review, and Sarah, you were going to "
                       "walk us through the numbers.", avg_logprob=-0.21, no_speech_prob=0.01, compression_ratio=1.4),
    Segment(12.5, 13.1, " Yes."),
    Segment(13.1, 24.0, " So overall we came in about 3% under budget, mostly because the hiring for the two new "
                        "positions in the platform team got pushed back to July."),
    Segment(27.0, 28.0, " Any questions?",
            words=(Word(27.1, 27.4, " Any", 0.98), Word(27.4, 27.95, " questions?", 0.9))),
    Segment(28.4, 29.0, " No."),
    Segment(29.2, 36.0, " Great. Then R&D: the <draft> is at "
                        "https://wiki.example.com/engineering/rnd/2025-q2-update.html --> please read it."),
)
SETTINGS = {"model": "openai/whisper-base", "device": "cpu", "temperatures": [0.0, 0.2], "vad": True}


def meeting() -> Transcript:
    return Transcript(language="en", segments=MEETING, duration=40.0, language_probability=0.987654,
                      settings=SETTINGS)


def test_srt_parses_numbered_from_one_and_matches_the_cues() -> None:
    transcript = meeting()
    text = render_srt(transcript)
    subs = list(srt.parse(text))
    cues = build_cues(transcript.segments, duration=transcript.duration)
    assert len(subs) == len(cues) >= 8
    assert [s.index for s in subs] == list(range(1, len(subs) + 1))
    for sub, cue in zip(subs, cues, strict=True):
        assert sub.content == "\n".join(cue.lines)
        assert sub.start == timedelta(milliseconds=round(cue.start * 1000))
        assert sub.end == timedelta(milliseconds=round(cue.end * 1000))
    assert "00:00:00,000 --> 00:00:04," in text
    for a, b in zip(subs, subs[1:]):
        assert a.end <= b.start
        assert a.end - a.start <= timedelta(seconds=7)


def test_vtt_parses_and_escapes_special_characters(tmp_path: Path) -> None:
    transcript = meeting()
    text = render_vtt(transcript)
    assert text.startswith("WEBVTT\n\n")
    assert "&amp;" in text and "&lt;draft&gt;" in text and "--&gt;" in text
    assert "<draft>" not in text
    captions = list(webvtt.from_string(text))
    cues = build_cues(transcript.segments, duration=transcript.duration)
    assert len(captions) == len(cues)
    for caption, cue in zip(captions, cues, strict=True):
        assert html.unescape(caption.text) == "\n".join(cue.lines)  # round-trips once unescaped
        assert abs(caption.start_in_seconds + caption.start_time.milliseconds / 1000 - cue.start) < 1e-6
    path = tmp_path / "meeting.vtt"
    path.write_text(text, encoding="utf-8")
    assert len(webvtt.read(str(path))) == len(cues)
    # HH:MM:SS.mmm even past an hour
    late = Transcript(language="en", segments=(Segment(3725.5, 3727.25, "Late remark."),), duration=3730.0)
    assert "01:02:05.500 --> 01:02:07.250" in render_vtt(late)


def test_subtitles_keep_every_word_in_order() -> None:
    transcript = meeting()
    expected = " ".join(seg.text for seg in transcript.segments).split()
    srt_words = " ".join(s.content for s in srt.parse(render_srt(transcript))).split()
    vtt_words = " ".join(html.unescape(c.text) for c in webvtt.from_string(render_vtt(transcript))).split()
    assert srt_words == expected
    assert vtt_words == expected


def test_long_segments_become_short_cues() -> None:
    words = ("we need to agree on the plan for the next release before the end of the month because the "
             "marketing team wants to announce it at the conference in june and they need the final list of "
             "features and the dates at least three weeks before that so please send me your estimates "
             "by friday").split()
    transcript = Transcript(language="en", segments=(Segment(0.0, 20.0, " ".join(words)),), duration=20.0)
    subs = list(srt.parse(render_srt(transcript)))
    assert len(subs) >= 3
    assert all(s.end - s.start <= timedelta(seconds=7) for s in subs)
    assert all(len(line) <= 42 for s in subs for line in s.content.split("\n"))
    assert all(len(s.content.split("\n")) <= 2 for s in subs)


def test_txt_starts_a_paragraph_at_a_long_pause() -> None:
    text = render_txt(meeting())
    paragraphs = text.rstrip("\n").split("\n\n")
    assert len(paragraphs) == 2  # the 3 s pause before "Any questions?"
    assert paragraphs[0].startswith("Okay, so I think") and paragraphs[0].endswith("pushed back to July.")
    assert paragraphs[1].startswith("Any questions? No. Great.")
    assert "  " not in text and text.endswith("\n") and not text.endswith("\n\n")
    # the pause is a parameter
    assert len(render_txt(meeting(), paragraph_pause=0.5).rstrip("\n").split("\n\n")) == 3
    assert render_txt(meeting(), paragraph_pause=100.0).count("\n") == 1


def test_txt_joins_cjk_without_spaces_and_empty_is_empty() -> None:
    transcript = Transcript(language="ja", segments=(Segment(0.0, 1.0, "はい。"), Segment(1.2, 2.0, "始めましょう。")),
                            duration=2.0)
    assert render_txt(transcript) == "はい。始めましょう。\n"
    assert render_txt(Transcript(language="en", segments=(), duration=0.0)) == ""


def test_json_round_trips_with_language_settings_and_rounded_times() -> None:
    transcript = meeting()
    data = json.loads(render_json(transcript))
    assert list(data) == ["language", "language_probability", "duration", "task", "text", "segments", "settings",
                          "repairs"]
    assert data["repairs"] == {"loops_collapsed": 0, "repeats_dropped": 0, "times_repaired": 0}
    assert data["language"] == "en"
    assert data["language_probability"] == 0.9877
    assert data["task"] == "transcribe"
    assert data["settings"] == SETTINGS
    assert data["text"].startswith("Okay, so I think everyone is here")
    assert len(data["segments"]) == len(MEETING)
    first, second, _, _, fifth = data["segments"][:5]
    assert first == {"start": 0.0, "end": 4.2, "text": "Okay, so I think everyone is here, so let's get started."}
    assert second["avg_logprob"] == -0.21 and second["no_speech_prob"] == 0.01 and second["compression_ratio"] == 1.4
    assert "words" not in first
    assert fifth["words"] == [{"start": 27.1, "end": 27.4, "text": " Any", "probability": 0.98},
                              {"start": 27.4, "end": 27.95, "text": " questions?", "probability": 0.9}]
    odd = Transcript(language="de", segments=(Segment(1 / 3, 2 / 3, "Hallo.", avg_logprob=float("-inf")),),
                     duration=10 / 3, settings={"model_path": Path("/models/base")})
    odd_data = json.loads(render_json(odd))  # strict: no Infinity
    assert odd_data["segments"][0] == {"start": 0.333, "end": 0.667, "text": "Hallo.", "avg_logprob": None}
    assert odd_data["duration"] == 3.333 and odd_data["language_probability"] is None
    assert odd_data["settings"] == {"model_path": "/models/base"}


def test_api_is_unchanged_and_writes_every_format(tmp_path: Path) -> None:
    assert list(FORMATS) == ["txt", "srt", "vtt", "json", "rttm"]
    audio = tmp_path / "standup.m4a"
    assert output_paths(audio, ["srt"]) == {"srt": tmp_path / "standup.srt"}
    paths = write_outputs(audio, meeting(), FORMATS)
    for fmt, path in paths.items():
        assert path.read_text(encoding="utf-8") == render(meeting(), fmt)
    with pytest.raises(ValueError):
        render(meeting(), "docx")


def test_cues_are_not_lengthened_past_the_end_of_the_recording() -> None:
    transcript = Transcript(language="en", segments=(Segment(9.6, 9.9, "Bye."),), duration=10.0)
    (sub,) = srt.parse(render_srt(transcript))
    assert sub.start == timedelta(seconds=9.6) and sub.end == timedelta(seconds=10)


def test_empty_transcript_renders_valid_empty_files() -> None:
    empty = Transcript(language="en", segments=(Segment(0.0, 1.0, "  "),), duration=1.0)
    assert list(srt.parse(render_srt(empty))) == []
    assert render_vtt(empty) == "WEBVTT\n"
    assert json.loads(render_json(empty))["segments"] == []


TEXT = st.text(alphabet=st.sampled_from(list("abcdef XYZ&<>-.,?!'\"é今日は。")), min_size=1, max_size=200)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.floats(0.0, 3.0), st.floats(0.0, 20.0), TEXT), min_size=1, max_size=6))
def test_any_transcript_gives_parseable_srt_and_vtt(parts: list[tuple[float, float, str]]) -> None:
    segments, t = [], 0.0
    for pause, length, text in parts:
        segments.append(Segment(t + pause, t + pause + length, text))
        t += pause + length
    transcript = Transcript(language="en", segments=tuple(segments), duration=t)
    expected = "".join("".join(seg.text.split()) for seg in segments)
    subs = list(srt.parse(render_srt(transcript)))
    assert [s.index for s in subs] == list(range(1, len(subs) + 1))
    assert "".join("".join(s.content.split()) for s in subs) == expected
    captions = list(webvtt.from_string(render_vtt(transcript)))
    assert "".join("".join(html.unescape(c.text).split()) for c in captions) == expected
    assert len(captions) == len(subs)
    if t > 0:  # never past the end of the recording (0: length unknown)
        assert all(s.end <= timedelta(seconds=t) + timedelta(milliseconds=2) for s in subs)


# ---------------------------------------------------------------- with speakers

TALK = (
    Segment(0.0, 2.0, " Shall we start?", speaker="Speaker 1",
            words=(Word(0.1, 0.6, " Shall", 0.9, "Speaker 1"), Word(0.6, 0.9, " we", 0.9, "Speaker 1"),
                   Word(0.9, 1.6, " start?", 0.9, "Speaker 1"))),
    Segment(2.3, 3.1, " Yes, please.", speaker="Speaker 2"),
    Segment(3.3, 6.0, " I'll share the <Q3> numbers & costs.", speaker="Speaker 2"),
    Segment(9.0, 10.0, " Thanks.", speaker="Speaker 2"),
    Segment(10.2, 12.0, " Looks good to me.", speaker="Speaker 1"),
)


def talk() -> Transcript:
    return Transcript(language="en", segments=TALK, duration=12.5)


def test_txt_names_the_speaker_of_every_paragraph() -> None:
    assert render_txt(talk()) == ("Speaker 1: Shall we start?\n\n"
                                  "Speaker 2: Yes, please. I'll share the <Q3> numbers & costs.\n\n"
                                  "Speaker 2: Thanks.\n\n"  # same speaker, after a 3 s pause
                                  "Speaker 1: Looks good to me.\n")


def test_srt_names_the_speaker_where_the_speaker_changes() -> None:
    subs = list(srt.parse(render_srt(talk())))
    contents = [s.content.replace("\n", " ") for s in subs]
    assert contents == ["Speaker 1: Shall we start?",
                        "Speaker 2: Yes, please.",
                        "I'll share the <Q3> numbers & costs.",  # Speaker 2 goes on: no label
                        "Thanks.",
                        "Speaker 1: Looks good to me."]
    assert subs[0].start == timedelta(milliseconds=100)  # the first word, not the segment start
    assert all(len(line) <= 42 for s in subs for line in s.content.split("\n"))
    assert all(a.end <= b.start for a, b in zip(subs, subs[1:]))


def test_vtt_puts_each_cue_in_a_voice_span() -> None:
    text = render_vtt(talk())
    assert "<v Speaker 1>Shall we start?</v>" in text
    assert "&lt;Q3&gt; numbers &amp; costs.</v>" in text
    captions = list(webvtt.from_string(text))
    assert [c.voice for c in captions] == ["Speaker 1", "Speaker 2", "Speaker 2", "Speaker 2", "Speaker 1"]
    assert html.unescape(captions[2].text) == "I'll share the <Q3> numbers & costs."
    assert "<v " not in render_vtt(meeting())


def test_json_has_speakers_on_segments_and_words_only_when_known() -> None:
    data = json.loads(render_json(talk()))
    first = data["segments"][0]
    assert list(first) == ["start", "end", "speaker", "text", "words"] and first["speaker"] == "Speaker 1"
    assert first["words"][0] == {"start": 0.1, "end": 0.6, "text": " Shall", "probability": 0.9, "speaker": "Speaker 1"}
    assert [s["speaker"] for s in data["segments"]] == ["Speaker 1", "Speaker 2", "Speaker 2", "Speaker 2", "Speaker 1"]
    assert "speaker" not in json.dumps(json.loads(render_json(meeting())))


def test_rttm_has_a_line_per_speaker_turn(tmp_path: Path) -> None:
    from whisperd.outputs.writers import render_rttm

    lines = render_rttm(talk(), file_id="team meeting").splitlines()
    assert lines == [
        "SPEAKER team_meeting 1 0.100 1.500 <NA> <NA> Speaker_1 <NA> <NA>",   # from its words
        "SPEAKER team_meeting 1 2.300 3.700 <NA> <NA> Speaker_2 <NA> <NA>",   # 0.2 s apart: one turn
        "SPEAKER team_meeting 1 9.000 1.000 <NA> <NA> Speaker_2 <NA> <NA>",
        "SPEAKER team_meeting 1 10.200 1.800 <NA> <NA> Speaker_1 <NA> <NA>",
    ]
    for line in lines:  # ten fields, as NIST's md-eval and pyannote read them
        fields = line.split()
        assert len(fields) == 10 and float(fields[3]) >= 0 and float(fields[4]) > 0
    # without speakers there is no one to name: an empty file, not an invented single speaker
    assert render(meeting(), "rttm") == ""
    paths = write_outputs(tmp_path / "weekly sync.m4a", talk(), ["rttm", "txt"])
    assert paths["rttm"].read_text(encoding="utf-8").startswith("SPEAKER weekly_sync 1 0.100 ")
    assert render(talk(), "rttm").startswith("SPEAKER audio 1 ")
