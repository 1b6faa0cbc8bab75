"""Render a Transcript as txt, srt, vtt or json and write the files next to the audio."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path

import srt

from whisperd.atomic import atomic_write_text
from whisperd.transcript import Segment, Transcript


def render_txt(transcript: Transcript) -> str:
    lines = [seg.text.strip() for seg in transcript.segments if seg.text.strip()]
    return "\n".join(lines) + ("\n" if lines else "")


def _cues(transcript: Transcript) -> Iterable[Segment]:
    return (seg for seg in transcript.segments if seg.text.strip())


def render_srt(transcript: Transcript) -> str:
    subtitles = [
        srt.Subtitle(index=i, start=timedelta(seconds=c.start), end=timedelta(seconds=c.end), content=c.text.strip())
        for i, c in enumerate(_cues(transcript), start=1)
    ]
    return srt.compose(subtitles, reindex=False)


def _vtt_time(seconds: float) -> str:
    millis = int(round(seconds * 1000))
    hours, rem = divmod(millis, 3_600_000)
    minutes, rem = divmod(rem, 60_000)
    secs, ms = divmod(rem, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}.{ms:03d}"


def _vtt_escape(text: str) -> str:
    """WebVTT cue text must escape &, < and >; '-->' inside text would end the timing line."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_vtt(transcript: Transcript) -> str:
    blocks = ["WEBVTT\n"]
    for cue in _cues(transcript):
        blocks.append(f"{_vtt_time(cue.start)} --> {_vtt_time(cue.end)}\n{_vtt_escape(cue.text.strip())}\n")
    return "\n".join(blocks)


def render_json(transcript: Transcript) -> str:
    return json.dumps(transcript.to_dict(), ensure_ascii=False, indent=2) + "\n"


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


def output_paths(audio_path: Path, formats: Iterable[str]) -> dict[str, Path]:
    """`talk.m4a` -> `talk.txt`, `talk.srt`, ... in the same folder."""
    return {fmt: audio_path.with_suffix(f".{fmt}") for fmt in formats}


def write_outputs(audio_path: Path, transcript: Transcript, formats: Iterable[str]) -> dict[str, Path]:
    """Render every format first, then write each atomically, so a render error writes nothing."""
    paths = output_paths(audio_path, formats)
    rendered = {fmt: render(transcript, fmt) for fmt in paths}
    for fmt, path in paths.items():
        atomic_write_text(path, rendered[fmt])
    return paths
