"""Render a Transcript as txt, srt, vtt, json or rttm and write the files next to the audio.

When speaker labelling ran (segments carry `speaker`), every format says who speaks: .txt starts
each paragraph with the speaker's name, SRT names the speaker at the first cue after each change,
WebVTT wraps each cue in a voice span (<v Speaker 1>), .json has `speaker` on segments and words,
and .rttm (the diarization exchange format) lists the speaker turns.  Without speakers the
txt, srt, vtt and json outputs are exactly what they were before speakers existed, and .rttm is
empty: there is no "who spoke when" to report, and inventing a single speaker would look like a
diarization result that was never made.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import srt

from whisperd.atomic import commit, discard, encode_text, stage_bytes
from whisperd.naming import output_paths
from whisperd.outputs.cues import build_cues, join_text
from whisperd.transcript import Segment, Transcript, Word

PARAGRAPH_PAUSE = 2.0  # seconds of silence between segments that start a new paragraph in .txt
RTTM_TURN_GAP = 0.5  # seconds: one speaker's words closer than this are one RTTM turn


def render_txt(transcript: Transcript, *, paragraph_pause: float = PARAGRAPH_PAUSE) -> str:
    """Running text: segments joined into paragraphs, a blank line wherever the speaker paused long.

    With speakers, a paragraph also starts at every change of speaker, and each one starts with
    the speaker's name ("Speaker 1: ...").
    """
    paragraphs: list[str] = []
    current = ""
    speaker: str | None = None
    last_end: float | None = None
    for seg in transcript.segments:
        text = " ".join(seg.text.split())
        if not text:
            continue
        paused = last_end is not None and seg.start - last_end >= paragraph_pause
        if current and (paused or seg.speaker != speaker):
            paragraphs.append(current)
            current = ""
        if current:
            current = join_text(current, text)
        else:
            current = text if seg.speaker is None else f"{seg.speaker}: {text}"
        speaker = seg.speaker
        last_end = seg.end if last_end is None else max(last_end, seg.end)
    if current:
        paragraphs.append(current)
    return "\n\n".join(paragraphs) + ("\n" if paragraphs else "")


def _millis(seconds: float) -> int:
    return int(round(seconds * 1000))


def render_srt(transcript: Transcript) -> str:
    """SubRip; with speakers, the first cue after each change of speaker starts "Speaker 2: ..."."""
    cues = build_cues(transcript.segments, duration=transcript.duration, speaker_labels=True)
    subtitles = [
        srt.Subtitle(index=i, start=timedelta(milliseconds=_millis(c.start)),
                     end=timedelta(milliseconds=_millis(c.end)), content="\n".join(c.lines))
        for i, c in enumerate(cues, start=1)
    ]
    return srt.compose(subtitles, reindex=False)


def _vtt_time(seconds: float) -> str:
    millis = _millis(seconds)
    hours, rem = divmod(millis, 3_600_000)
    minutes, rem = divmod(rem, 60_000)
    secs, ms = divmod(rem, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}.{ms:03d}"


def _vtt_escape(text: str) -> str:
    """WebVTT cue text must escape &, < and >; '-->' inside text would end the timing line."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_vtt(transcript: Transcript) -> str:
    """WebVTT; with speakers, each cue is one voice span: <v Speaker 1>text</v>."""
    blocks = ["WEBVTT\n"]
    for cue in build_cues(transcript.segments, duration=transcript.duration):
        text = "\n".join(_vtt_escape(line) for line in cue.lines)
        if cue.speaker is not None:
            text = f"<v {_vtt_escape(cue.speaker)}>{text}</v>"
        blocks.append(f"{_vtt_time(cue.start)} --> {_vtt_time(cue.end)}\n{text}\n")
    return "\n".join(blocks)


def _seconds(value: float) -> float:
    return round(float(value), 3)


def _segment_dict(seg: Segment) -> dict[str, Any]:
    out: dict[str, Any] = {"start": _seconds(seg.start), "end": _seconds(seg.end)}
    if seg.speaker is not None:
        out["speaker"] = seg.speaker
    out["text"] = seg.text.strip()
    if seg.words:
        out["words"] = [
            {"start": _seconds(w.start), "end": _seconds(w.end), "text": w.text,
             **({"probability": round(w.probability, 4)} if w.probability is not None else {}),
             **({"speaker": w.speaker} if w.speaker is not None else {})}
            for w in seg.words
        ]
    for key in ("avg_logprob", "no_speech_prob", "compression_ratio", "temperature"):
        value = getattr(seg, key)
        if value is not None:
            # JSON has no infinity: -inf log-probability (Whisper's "gave up") is written as null.
            out[key] = round(float(value), 4) if math.isfinite(value) else None
    return out


def _full_text(segments: Iterable[Segment]) -> str:
    text = ""
    for seg in segments:
        text = join_text(text, " ".join(seg.text.split()))
    return text


def transcript_dict(transcript: Transcript) -> dict[str, Any]:
    """The .json shape: stable keys, times in seconds rounded to milliseconds."""
    probability = transcript.language_probability
    return {
        "language": transcript.language,
        "language_probability": round(float(probability), 4) if probability is not None else None,
        "duration": _seconds(transcript.duration),
        "task": transcript.task,
        "text": _full_text(transcript.segments),
        "segments": [_segment_dict(seg) for seg in transcript.segments if seg.text.strip()],
        "settings": dict(transcript.settings),
        "repairs": dataclasses.asdict(transcript.repairs),
    }


def render_json(transcript: Transcript) -> str:
    # default=str: a setting that JSON can't hold (a Path, say) is written as its text, never an error.
    return json.dumps(transcript_dict(transcript), ensure_ascii=False, indent=2, default=str) + "\n"


def speaker_turns(segments: Iterable[Segment], *, gap: float = RTTM_TURN_GAP) -> list[tuple[float, float, str]]:
    """(start, end, speaker) turns from the labelled words (or segments, where a segment has no
    words): consecutive speech of one speaker less than `gap` seconds apart is one turn."""
    spoken: list[tuple[float, float, str]] = []
    for seg in segments:
        if not seg.text.strip():
            continue
        items: list[Word | Segment] = [w for w in seg.words if w.text.strip()] or [seg]
        for item in items:
            speaker = item.speaker or seg.speaker
            if speaker is not None:
                spoken.append((float(item.start), max(float(item.end), float(item.start)), speaker))
    turns: list[tuple[float, float, str]] = []
    for start, end, speaker in sorted(spoken, key=lambda t: (t[0], t[1])):
        if turns and turns[-1][2] == speaker and start - turns[-1][1] < gap:
            turns[-1] = (turns[-1][0], max(turns[-1][1], end), speaker)
        else:
            turns.append((start, end, speaker))
    return turns


def _rttm_field(text: str, empty: str) -> str:
    """RTTM fields are separated by spaces: "Speaker 1" is written Speaker_1."""
    return "_".join(text.split()) or empty


def render_rttm(transcript: Transcript, file_id: str = "audio") -> str:
    """NIST RTTM: one SPEAKER line per speaker turn, times in seconds with 3 decimals.

    Without speakers the file is empty (see the module docstring).
    """
    name = _rttm_field(file_id, "audio")
    lines = []
    for start, end, speaker in speaker_turns(transcript.segments):
        duration = round(end, 3) - round(start, 3)
        if duration > 0:
            lines.append(f"SPEAKER {name} 1 {start:.3f} {duration:.3f} <NA> <NA> "
                         f"{_rttm_field(speaker, 'unknown')} <NA> <NA>\n")
    return "".join(lines)


FORMATS: dict[str, Callable[[Transcript], str]] = {
    "txt": render_txt,
    "srt": render_srt,
    "vtt": render_vtt,
    "json": render_json,
    "rttm": render_rttm,
}


def render(transcript: Transcript, fmt: str, *, name: str | None = None) -> str:
    """`transcript` in format `fmt`; `name` (the recording's file name without suffix) is the RTTM file id."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "rttm" and name is not None:
        return render_rttm(transcript, file_id=name)
    return FORMATS[fmt](transcript)


def write_outputs(audio_path: Path, transcript: Transcript, formats: Iterable[str], *, mode: int | None = None,
                  before_commit: Callable[[], None] | None = None) -> dict[str, Path]:
    """Render every format, stage each as a fresh temp file, then rename them all into place.

    A render error, a full disk or `before_commit` raising (the recording vanished, say) leaves no
    output and no temp file behind; see whisperd.atomic for why the set is renamed together.
    """
    paths = output_paths(audio_path, formats)
    rendered = {fmt: render(transcript, fmt, name=audio_path.stem) for fmt in paths}
    staged = []
    try:
        for fmt, path in paths.items():
            staged.append(stage_bytes(path, encode_text(rendered[fmt]), mode))
    except BaseException:
        discard(staged)
        raise
    commit(staged, before_commit)
    return paths
