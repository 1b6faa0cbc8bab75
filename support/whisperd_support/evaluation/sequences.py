"""Recordings of unrelated pieces played one after another, 1.5 s apart: where long-form decoding
invents copies, loops and segments without time.

A meeting (:mod:`whisperd_support.evaluation.meeting`) has pauses of 1-10 s, so most speaker
changes fall between VAD windows. Here the pieces follow each other closely, as in a recording of
a phone call, then prompts, then a talk: several pieces share a window, and a window's text must
cover speech of different speakers, levels and bandwidths. Each piece is also what it would be
transcribed alone, so "no worse than each piece alone" can be measured.

How a sequence is built (deterministic):
* each piece is a dev clip, or a stretch of one (``clip_id@start-end`` seconds), decoded at 16 kHz,
  optionally passed through a telephone channel (``clip_id~phone``: 8 kHz G.711 mu-law and back,
  300-3400 Hz; a simulation of the channel over real speech, said so in the piece's name);
* each piece is scaled to -26 dBFS RMS (peaks kept below -1 dBFS);
* GAP_SECONDS of synthetic low noise (-60 dBFS) before, between and after the pieces.

Sequences in :data:`SEQUENCES` name which clips they use; ``held-out`` ones use only clips that
chose no threshold (``set: held-out`` in dev_clips.json).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

__all__ = ["SEQUENCES", "Piece", "Sequence", "build_sequence", "phone_channel"]

SAMPLING_RATE = 16000
GAP_SECONDS = 1.5
LEVEL_DBFS = -26.0
NOISE_DBFS = -60.0

#: name -> (set, pieces). Held-out sequences use only held-out clips.
SEQUENCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "call-then-prompts": ("held-out", (
        "en_voxconverse_aepyx_8k@0-25", "en_praatio_mary", "en_commonvoice_22058266~phone", "en_praatio_bobby",
        "en_voxconverse_aepyx_8k@75-100", "en_mfa_mfa_laughter", "en_commonvoice_22058266",
        "en_voxconverse_aepyx_8k@140-169", "en_mfa_whisper~phone", "en_praatio_mary~phone",
    )),
    "news-programme": ("held-out", ("en_voxconverse_aepyx_8k",)),
    "readers-close-together": ("dev", (
        "en_goforward", "en_librivox_ss01_0890", "en_librivox_ss01_0870~phone", "en_mfa_acoustic_corpus",
        "en_cards_005", "en_librispeech_61-70968-0000~phone", "en_mfa_cold_corpus", "en_librivox_ss01_0920",
    )),
    "news-then-readers": ("dev", (
        "en_voxconverse_aepyx_8k@0-20", "en_librivox_ss01_0870", "en_cards_005", "en_goforward",
        "en_mfa_acoustic_corpus", "en_librispeech_61-70968-0000", "en_mfa_cold_corpus",
    )),
}

_PIECE = re.compile(r"^(?P<clip>[\w.-]+?)(?:@(?P<start>[\d.]+)-(?P<end>[\d.]+))?(?P<phone>~phone)?$")


@dataclass(frozen=True)
class Piece:
    """One piece in the sequence: where it plays (seconds), what it is, and what is said in it ("" when
    its clip has no published transcript)."""

    name: str
    start: float
    end: float
    reference: str
    audio: np.ndarray


@dataclass(frozen=True)
class Sequence:
    name: str
    set: str
    audio: np.ndarray
    pieces: tuple[Piece, ...]

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLING_RATE


def phone_channel(audio: np.ndarray) -> np.ndarray:
    """Speech as a telephone line carries it: band-limited to 300-3400 Hz, 8 kHz G.711 mu-law, and
    back to 16 kHz."""
    spectrum = np.fft.rfft(audio)
    freqs = np.fft.rfftfreq(len(audio), 1 / SAMPLING_RATE)
    spectrum[(freqs < 300) | (freqs > 3400)] = 0
    narrow = np.fft.irfft(spectrum, len(audio))[::2]  # 8 kHz: nothing above 4 kHz is left to alias
    mu = 255.0
    coded = np.sign(narrow) * np.log1p(mu * np.minimum(np.abs(narrow), 1.0)) / np.log1p(mu)
    coded = np.round(coded * 127) / 127  # 8 bits
    decoded = np.sign(coded) * np.expm1(np.abs(coded) * np.log1p(mu)) / mu
    wide = np.zeros(len(audio), dtype=np.float64)
    wide[::2] = decoded
    spectrum = np.fft.rfft(wide) * 2
    spectrum[freqs > 4000] = 0
    return np.fft.irfft(spectrum, len(audio)).astype(np.float32)


def _level(audio: np.ndarray) -> np.ndarray:
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) or 1.0
    scaled = audio * (10 ** (LEVEL_DBFS / 20) / rms)
    peak = float(np.max(np.abs(scaled))) or 1.0
    limit = 10 ** (-1 / 20)
    return (scaled * min(1.0, limit / peak)).astype(np.float32)


def build_sequence(name: str) -> Sequence:
    """The named sequence of :data:`SEQUENCES` (clips fetched on first use)."""
    from whisperd.audio import decode_audio
    from whisperd_support.evaluation.clips import fetch_clips

    kind, names = SEQUENCES[name]
    parsed = [_PIECE.match(piece) for piece in names]
    if not all(parsed):
        raise ValueError(f"{name}: bad piece name in {names}")
    clips = {c.id: c for c in fetch_clips(sorted({m["clip"] for m in parsed if m}))}
    rng = np.random.default_rng(len(name))
    gap = int(GAP_SECONDS * SAMPLING_RATE)
    parts = [np.zeros(gap, dtype=np.float32)]
    pieces = []
    position = gap
    for piece_name, match in zip(names, parsed):
        assert match is not None
        clip = clips[match["clip"]]
        audio = decode_audio(clip.path)
        if match["start"] is not None:
            audio = audio[int(float(match["start"]) * SAMPLING_RATE):int(float(match["end"]) * SAMPLING_RATE)]
        if match["phone"]:
            audio = phone_channel(audio)
        audio = _level(audio)
        reference = clip.reference if match["start"] is None else ""  # a stretch has no transcript of its own
        pieces.append(Piece(piece_name, position / SAMPLING_RATE, (position + len(audio)) / SAMPLING_RATE,
                            reference, audio))
        parts += [audio, np.zeros(gap, dtype=np.float32)]
        position += len(audio) + gap
    audio = np.concatenate(parts)
    audio += rng.normal(0.0, 10 ** (NOISE_DBFS / 20), len(audio)).astype(np.float32)
    return Sequence(name, kind, audio, tuple(pieces))


@dataclass(frozen=True)
class Verdict:
    """One engine on one sequence, against each piece transcribed alone by the same engine.

    ``wer`` and ``wer_alone`` count errors on the pieces that have a reference (the sequence's
    transcript is aligned to all that was said, and errors in the other pieces are not counted);
    what was said is the references, and for a piece without one its own transcript alone.
    ``repeated`` counts 6-word runs written again soon after they were (repeated_passages); ``loops``
    phrases written 4 or more times in a row beyond what was said; ``short`` segments under 0.2 s.
    """

    name: str
    wer: float
    wer_alone: float
    repeated: int
    loops: int
    short: int
    seconds: float
    repairs: dict[str, int]
    text: str


def judge(engine: object, sequence: Sequence, language: str = "en") -> Verdict:
    """Transcribe the sequence, then each piece alone (with 1 s of the sequence either side)."""
    import dataclasses
    import time

    from whisperd.options import DecodeOptions
    from whisperd_support.evaluation.metrics import repeated_passages, short_segments, spoken_loops
    from whisperd_support.evaluation.scoring import error_rate

    options = DecodeOptions(language=language)
    started = time.perf_counter()
    transcript = engine.transcribe(sequence.audio, options)  # type: ignore[attr-defined]
    seconds = time.perf_counter() - started
    margin = SAMPLING_RATE
    alone = [engine.transcribe(sequence.audio[max(0, int(p.start * SAMPLING_RATE) - margin):  # type: ignore[attr-defined]
                                              int(p.end * SAMPLING_RATE) + margin], options).text
             for p in sequence.pieces]
    said = " ".join(p.reference or text for p, text in zip(sequence.pieces, alone))
    scored = [i for i, p in enumerate(sequence.pieces) if p.reference]
    references = [sequence.pieces[i].reference for i in scored]
    return Verdict(
        name=sequence.name,
        wer=_error_rate_of_scored(sequence.pieces, alone, transcript.text, language) if scored else float("nan"),
        wer_alone=error_rate(references, [alone[i] for i in scored], language) if scored else float("nan"),
        repeated=repeated_passages(transcript.text, said),
        loops=spoken_loops(transcript.text, said),
        short=short_segments(transcript.segments),
        seconds=seconds,
        repairs=dataclasses.asdict(transcript.repairs) if hasattr(transcript, "repairs") else {},
        text=transcript.text,
    )


def _error_rate_of_scored(pieces: tuple[Piece, ...], alone: list[str], hypothesis: str, language: str) -> float:
    """Word errors of `hypothesis` in the pieces with a reference, over their reference words.

    The hypothesis is aligned to what was said in the whole sequence (references, and the
    transcript alone of a piece without one); a substitution or deletion belongs to the piece of
    its reference word, an insertion to the piece of the reference word before it (text invented
    in the pause after a piece counts against that piece).
    """
    import jiwer

    from whisperd_support.evaluation.scoring import normalize_text

    words: list[str] = []
    owner: list[int] = []
    for i, (piece, text) in enumerate(zip(pieces, alone)):
        said = normalize_text(piece.reference or text, language).split()
        words += said
        owner += [i] * len(said)
    scored = [bool(p.reference) for p in pieces]
    hyp = normalize_text(hypothesis, language)
    alignment = jiwer.process_words(" ".join(words), hyp or "<empty>").alignments[0]
    errors = 0
    for chunk in alignment:
        if chunk.type in ("substitute", "delete"):
            errors += sum(scored[owner[k]] for k in range(chunk.ref_start_idx, chunk.ref_end_idx))
        elif chunk.type == "insert" and owner:
            k = min(max(chunk.ref_start_idx - 1, 0), len(owner) - 1)
            errors += (chunk.hyp_end_idx - chunk.hyp_start_idx) * scored[owner[k]]
    total = sum(scored[o] for o in owner)
    return errors / total if total else float("nan")
