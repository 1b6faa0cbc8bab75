#!/usr/bin/env python
"""Speaker diarization: DER, speaker count and speed on recordings with known speakers.

    .venv/bin/python benchmarks/diarization.py [--transcribe] [--seed 0] [--json PATH]

Recordings, both assembled from the real dev clips by whisperd_support.evaluation.meeting (so where each
clip's speech starts and ends is known to the sample):

* meeting: the dev meeting, ``build_meeting(seed)`` (English, about 3.5 minutes, 60 s of silence);
* panel: a multilingual panel, ``build_meeting(seed, clip_ids=PANEL_CLIPS, silence_s=5)``:
  Mandarin, Spanish, Swedish, Japanese and two English speakers.

Who is who (:data:`SPEAKER_OF`; the manifest names no speakers, so this is read from the clips'
sources): the five LibriVox clips are one reader (the manifest says so), the two playing-cards
clips are one pocketsphinx test speaker (their voice prints agree, cosine 0.67), "go forward" is
another; the MFA author speaks the acoustic and cold corpora (the MFA test suite files them
under speakers "michael" and "sickmichael", one person with a cold) and mfa_surround (filed
under "michael" in the same suite); falsetto2 is counted as a speaker of its own: the suite does
not say who speaks it, and its falsetto voice matches no other clip (cosine <= 0.42).  The
AISHELL clips are speaker S0764, the NST clips speaker se10x016.

Reference turns are each placed clip's speech (the builder trims the clip edges to speech with
``speech_bounds``); pauses inside a clip count as speech.  Hypothesis: the daemon's VAD
(whisperd.vad) finds speech, the VAD windows are handed one by one to a SpeakerEmbedder (as the
streaming engine would), and ``diarize()`` clusters them.  DER is pyannote.metrics'
``DiarizationErrorRate(collar=0.5)``: pyannote's collar is the total width, so 0.25 s either
side of every reference boundary is not scored; overlapping speech does not occur here.

Speed: seconds of wall time per minute of recording, and per minute of speech (as the VAD found
it), for fbank + embedding + clustering on one thread; the model load, once per process, apart
(sha256 check and ONNX session; the first use on a machine also exports the model, 2-6 s).

With ``--transcribe`` the recording is also transcribed by the default CPU engine, to compare the
two and to score speaker labels per word (the share of words whose label, mapped to the reference
speaker by pyannote's optimal mapping, is the speaker of the clip the word lies in).
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1] / "support"))  # whisperd_support: clips, meetings

import argparse
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "daemon"))

PANEL_CLIPS = (
    "zh_aishell1_BAC009S0764W0121",
    "zh_aishell1_BAC009S0764W0122",
    "es_mls_13697_11991_000000",
    "sv_nst_u0016002",
    "sv_nst_u0016003",
    "sv_nst_u0016004",
    "ja_commonvoice_24511055",
    "en_librivox_ss01_0870",
    "en_librivox_ss01_0890",
    "en_mfa_acoustic_corpus",
)

# Clip id prefix -> speaker (see the module docstring for why).
SPEAKER_OF = {
    "en_librivox_ss01_": "librivox-reader",
    "en_librispeech_61-": "librispeech-61",
    "en_goforward": "pocketsphinx-goforward",
    "en_cards_": "pocketsphinx-cards",
    "en_mfa_acoustic_corpus": "mfa-author",
    "en_mfa_cold_corpus": "mfa-author",
    "en_mfa_mfa_surround": "mfa-author",
    "en_mfa_falsetto2": "mfa-falsetto2",
    "zh_aishell1_BAC009S0764": "aishell-S0764",
    "es_mls_13697_": "mls-13697",
    "sv_nst_": "nst-se10x016",
    "ja_commonvoice_24511055": "commonvoice-ja",
}


def speaker_of(clip_id: str) -> str:
    for prefix, speaker in SPEAKER_OF.items():
        if clip_id.startswith(prefix):
            return speaker
    raise KeyError(f"no speaker known for clip {clip_id}")


@dataclass
class Result:
    name: str
    minutes: float
    speakers: int
    found: int
    der: float
    der_oracle: float  # with the true speaker count given
    missed: float
    false_alarm: float
    confusion: float
    seconds_per_minute: float
    seconds_per_speech_minute: float
    windows: int
    transcribe_seconds_per_minute: float | None = None
    word_accuracy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def annotation(turns: list[tuple[float, float, str]]):  # noqa: ANN201 - pyannote.core.Annotation
    from pyannote.core import Annotation, Segment

    out = Annotation()
    for start, end, label in turns:
        if end > start:
            out[Segment(start, end)] = label
    return out


def evaluate(name: str, meeting, detector, engine=None) -> Result:  # noqa: ANN001
    from pyannote.metrics.diarization import DiarizationErrorRate

    from whisperd.speakers import SpeakerEmbedder, assign_speakers
    from whisperd.vad import plan_windows

    audio = meeting.audio
    reference = annotation([(c.onset_s, c.offset_s, speaker_of(c.clip_id)) for c in meeting.clips])
    spans = detector.speech_spans(audio)
    windows = plan_windows(spans, len(audio), detector.options)

    started = time.perf_counter()
    embedder = SpeakerEmbedder()
    for window in windows:
        embedder.add(audio[window.start:window.end], window.start, window.spans)
    turns = embedder.diarize()
    seconds = time.perf_counter() - started
    oracle = embedder.diarize(len(reference.labels()))

    hypothesis = annotation([(t.start, t.end, t.speaker) for t in turns])
    metric = DiarizationErrorRate(collar=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "uem was approximated": the union of both is what we want
        detail = metric(reference, hypothesis, detailed=True)
        der_oracle = DiarizationErrorRate(collar=0.5)(reference, annotation([(t.start, t.end, t.speaker)
                                                                              for t in oracle]))
    total = detail["total"]
    minutes = meeting.duration_s / 60
    result = Result(
        name=name, minutes=minutes, speakers=len(reference.labels()), found=len({t.speaker for t in turns}),
        der=detail["diarization error rate"], der_oracle=der_oracle, missed=detail["missed detection"] / total,
        false_alarm=detail["false alarm"] / total, confusion=detail["confusion"] / total,
        seconds_per_minute=seconds / minutes, windows=len(embedder.windows),
        seconds_per_speech_minute=seconds / (sum(s.end - s.start for s in spans) / 16000 / 60),
    )
    if engine is not None:
        from whisperd.options import DecodeOptions

        language = "en" if name == "meeting" else "auto"
        started = time.perf_counter()
        transcript = engine.transcribe(audio, DecodeOptions(language=language, word_timestamps=True))
        result.transcribe_seconds_per_minute = (time.perf_counter() - started) / minutes
        labelled = assign_speakers(transcript.segments, turns)
        mapping = metric.optimal_mapping(reference, hypothesis)  # hypothesis label -> reference label
        right = total_words = 0
        for seg in labelled:
            for word in seg.words or ():
                middle = (word.start + word.end) / 2
                truth = [speaker_of(c.clip_id) for c in meeting.clips
                         if c.onset_s - 0.25 <= middle <= c.offset_s + 0.25]
                if not truth:
                    continue  # a word Whisper put outside every clip's speech: nobody's
                total_words += 1
                right += mapping.get(word.speaker) == truth[0]
        result.word_accuracy = right / total_words if total_words else None
        result.extra["words_scored"] = total_words
    return result


def print_table(results: list[Result], load_seconds: float) -> None:
    head = ("| recording | minutes | speakers | found | DER | DER (count given) | missed | false alarm | confusion "
            "| diarize s/min | s/speech min | windows |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in results:
        print(f"| {r.name} | {r.minutes:.2f} | {r.speakers} | {r.found} | {100 * r.der:.1f} % | "
              f"{100 * r.der_oracle:.1f} % | {100 * r.missed:.1f} % | {100 * r.false_alarm:.1f} % | "
              f"{100 * r.confusion:.1f} % | {r.seconds_per_minute:.2f} | {r.seconds_per_speech_minute:.2f} | "
              f"{r.windows} |")
    print(f"\nspeaker model load, once per process: {load_seconds:.2f} s")
    if any(r.transcribe_seconds_per_minute is not None for r in results):
        print("\n| recording | transcribe s/min | diarize s/min | words with the right speaker |")
        print("|---|---|---|---|")
        for r in results:
            accuracy = ("n/a" if r.word_accuracy is None
                        else f"{100 * r.word_accuracy:.1f} % of {r.extra['words_scored']}")
            print(f"| {r.name} | {r.transcribe_seconds_per_minute:.2f} | {r.seconds_per_minute:.2f} | {accuracy} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="meeting builder seed")
    ap.add_argument("--transcribe", action="store_true",
                    help="also transcribe with the default CPU engine (speed comparison, word labels)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    from whisperd.speakers.embedding import default_encoder
    from whisperd.vad import SpeechDetector
    from whisperd_support.evaluation.meeting import build_meeting

    recordings = {
        "meeting": build_meeting(seed=args.seed),
        "panel": build_meeting(seed=args.seed, clip_ids=PANEL_CLIPS, silence_s=5.0),
    }
    detector = SpeechDetector()
    detector.warm_up()
    started = time.perf_counter()
    default_encoder()
    load_seconds = time.perf_counter() - started
    engine = None
    if args.transcribe:
        from whisperd.engine import create_engine
        from whisperd.options import EngineSettings

        engine = create_engine(EngineSettings(model="openai/whisper-base", device="cpu"))
    results = [evaluate(name, meeting, detector, engine) for name, meeting in recordings.items()]
    print_table(results, load_seconds)
    if engine is not None:
        described = engine.describe()
        print("\ntranscription: " + ", ".join(f"{k} {described[k]}" for k in ("model", "backend", "device", "precision")
                                             if k in described))
    if args.json:
        args.json.write_text(json.dumps({"load_seconds": load_seconds, "results": [r.__dict__ for r in results]},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
