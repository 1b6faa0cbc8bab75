"""Render a Transcript as txt, srt, vtt or json and write the files next to the audio."""

from __future__ import annotations

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
from whisperd.transcript import Segment, Transcript

PARAGRAPH_PAUSE = 2.0  # seconds of silence between segments that start a new paragraph in .txt


def render_txt(transcript: Transcript, *, paragraph_pause: float = PARAGRAPH_PAUSE) -> str:
    """Running text: segments joined into paragraphs, a blank line wherever the speaker paused long."""
    paragraphs: list[str] = []
    current = ""
    last_end: float | None = None
    for seg in transcript.segments:
        text = " ".join(seg.text.split())
        if not text:
            continue
        if current and last_end is not None and seg.start - last_end >= paragraph_pause:
            paragraphs.append(current)
            current = ""
        current = join_text(current, text)
        last_end = seg.end if last_end is None else max(last_end, seg.end)
    if current:
        paragraphs.append(current)
    return "\n\n".join(paragraphs) + ("\n" if paragraphs else "")


def _millis(seconds: float) -> int:
    return int(round(seconds * 1000))


def render_srt(transcript: Transcript) -> str:
    subtitles = [
        srt.Subtitle(index=i, start=timedelta(milliseconds=_millis(c.start)),
                     end=timedelta(milliseconds=_millis(c.end)), content="\n".join(c.lines))
        for i, c in enumerate(build_cues(transcript.segments, duration=transcript.duration), start=1)
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
    blocks = ["WEBVTT\n"]
    for cue in build_cues(transcript.segments, duration=transcript.duration):
        text = "\n".join(_vtt_escape(line) for line in cue.lines)
        blocks.append(f"{_vtt_time(cue.start)} --> {_vtt_time(cue.end)}\n{text}\n")
    return "\n".join(blocks)


def _seconds(value: float) -> float:
    return round(float(value), 3)


def _segment_dict(seg: Segment) -> dict[str, Any]:
    out: dict[str, Any] = {"start": _seconds(seg.start), "end": _seconds(seg.end), "text": seg.text.strip()}
    if seg.words:
        out["words"] = [
            {"start": _seconds(w.start), "end": _seconds(w.end), "text": w.text,
             **({"probability": round(w.probability, 4)} if w.probability is not None else {})}
            for w in seg.words
        ]
    for key in ("avg_logprob", "no_speech_prob", "compression_ratio"):
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
    }


def render_json(transcript: Transcript) -> str:
    # default=str: a setting that JSON can't hold (a Path, say) is written as its text, never an error.
    return json.dumps(transcript_dict(transcript), ensure_ascii=False, indent=2, default=str) + "\n"


FORMATS: dict[str, Callable[[Transcript], str]] = {
    "txt": render_txt,
    "srt": render_srt,
    "vtt": render_vtt,
    "json": render_json,
}


def render(transcript: Transcript, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}: use one of {', '.join(FORMATS)}")
    return FORMATS[fmt](transcript)


def write_outputs(audio_path: Path, transcript: Transcript, formats: Iterable[str], *, mode: int | None = None,
                  before_commit: Callable[[], None] | None = None) -> dict[str, Path]:
    """Render every format, stage each as a fresh temp file, then rename them all into place.

    A render error, a full disk or `before_commit` raising (the recording vanished, say) leaves no
    output and no temp file behind; see whisperd.atomic for why the set is renamed together.
    """
    paths = output_paths(audio_path, formats)
    rendered = {fmt: render(transcript, fmt) for fmt in paths}
    staged = []
    try:
        for fmt, path in paths.items():
            staged.append(stage_bytes(path, encode_text(rendered[fmt]), mode))
    except BaseException:
        discard(staged)
        raise
    commit(staged, before_commit)
    return paths
