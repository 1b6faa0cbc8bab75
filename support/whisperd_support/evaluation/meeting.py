"""A long, meeting-like English recording assembled from the real dev clips, with known boundaries.

The dev clips are short single utterances; what the daemon mostly sees is long recordings
with several people, pauses, background noise and stretches where nobody speaks. This module
joins English dev clips from several speakers into one file whose ground truth is known
exactly: the reference text (the clips' references in playing order), where every clip's
speech starts and ends, and one stretch of :data:`SILENCE_SECONDS` seconds with no speech.
It is what long-form accuracy, subtitle timing (cue starts against the true onsets) and
hallucination on silence (words emitted inside the silent stretch) are measured on.

How it is built (all of it deterministic for a given ``seed`` and set of parameters):

* Clips: :data:`MEETING_CLIPS` - a female LibriVox reader (five sentences of Sense and
  Sensibility), a male LibriSpeech reader, the pocketsphinx "go forward" and two
  playing-cards utterances, the MFA author's spontaneous acoustic and cold corpora (with
  fillers), his falsetto clip and his "surround" clip. Left out: the laughter clip and
  "Fire fox" (references that are tags or a single word), the stereo
  ``michaelandsickmichael`` (it is the acoustic and cold corpora again), and the whispered
  clip (about 25 dB quieter than the rest; bringing it up to speech level would mostly
  amplify its noise).
* Each clip is trimmed to its speech (frame energy against the clip's own noise floor) plus
  :data:`MARGIN_SECONDS` of its own audio on either side, and scaled so that its speech
  level - the median energy of its speech frames, which one loud burst does not move (the
  cold-corpus speaker has one 15 dB above the rest) - is ``speech_dbfs`` (-28 dBFS by
  default, about -26 dBFS RMS over the speech; peaks kept below -1 dBFS).
* Order: a seeded shuffle; pauses between one clip's last speech and the next clip's first
  speech are drawn uniformly from ``pause_range`` (1-10 s).
* Room noise: **synthetic** pink noise (1/f power from 40 Hz up, seeded) at ``noise_dbfs``
  RMS (-48 dBFS by default) over the whole file, so there is no digital silence anywhere.
  It is not a recording of a room.
* Silence: the gap closest to the middle of the file is replaced by 1 s + ``silence_s`` +
  1 s of noise only; :attr:`Meeting.silence` is the inner ``silence_s`` seconds.
* ``target_seconds`` (e.g. 600): clips are cycled, each cycle in a fresh seeded order with
  fresh pauses, while they fit; the file is then padded with noise to exactly that length.
* Samples lie on the 16-bit grid, so the in-memory audio and the saved 16-bit WAV decode to
  the same numbers.

Builds are cached under ``whisperd.paths.cache_dir() / "meetings"`` keyed by every parameter
and by the clips' manifest entries; a build takes about a second, a cache hit less.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from whisperd import paths

__all__ = [
    "MEETING_CLIPS",
    "SILENCE_SECONDS",
    "Meeting",
    "PlacedClip",
    "build_meeting",
    "meeting_cache_dir",
    "meeting_path",
]

# Bump when the construction or the sidecar changes, so stale cached files are not reused.
BUILD_VERSION = 2
# Seeds the random generator together with ``seed``; changing it changes every meeting.
_RNG_STREAM = 1

SAMPLING_RATE = 16000
SILENCE_SECONDS = 60.0
MARGIN_SECONDS = 0.25  # clip audio kept before the first and after the last speech frame
SILENCE_GUARD_SECONDS = 1.0  # noise between the neighbouring clips' speech and the silent stretch
TAIL_SECONDS = 2.0  # noise after the last clip's speech
LEAD_RANGE = (0.5, 2.0)  # noise before the first clip's speech
FADE_SECONDS = 0.015

MEETING_CLIPS: tuple[str, ...] = (
    "en_librivox_ss01_0870",
    "en_librivox_ss01_0880",
    "en_librivox_ss01_0890",
    "en_librivox_ss01_0920",
    "en_librivox_ss01_0930",
    "en_librispeech_61-70968-0000",
    "en_goforward",
    "en_cards_002",
    "en_cards_005",
    "en_mfa_acoustic_corpus",
    "en_mfa_cold_corpus",
    "en_mfa_falsetto2",
    "en_mfa_mfa_surround",
)

_FRAME = 160  # 10 ms energy frames
_MIN_SPEECH_FRAMES = 5  # a speech boundary needs 50 ms of consecutive frames above threshold


class PlacedClip(NamedTuple):
    """One clip in the meeting: its speech runs from ``onset_s`` to ``offset_s`` (file seconds).

    Times are exact sample positions divided by the sampling rate (not rounded), so
    ``round(onset_s * sampling_rate)`` is the sample where the clip's speech starts.
    """

    clip_id: str
    onset_s: float
    offset_s: float
    reference: str


@dataclass(frozen=True, eq=False)
class Meeting:
    """The assembled recording and its ground truth.

    ``audio`` is float32 mono at ``sampling_rate``; ``clips`` are in playing order (a clip
    id appears several times in a ``target_seconds`` build); ``reference`` is their
    references joined in that order; ``silence`` is the (start, end) of the stretch with no
    speech, in seconds.
    """

    audio: np.ndarray
    sampling_rate: int
    reference: str
    clips: list[PlacedClip]
    silence: tuple[float, float]
    duration_s: float
    language: str = "en"
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def onsets(self) -> list[float]:
        return [c.onset_s for c in self.clips]

    def sidecar(self) -> dict[str, Any]:
        """The JSON sidecar's content: everything but the samples."""
        return {
            "sampling_rate": self.sampling_rate,
            "duration_s": self.duration_s,
            "language": self.language,
            "silence": list(self.silence),
            "reference": self.reference,
            "clips": [c._asdict() for c in self.clips],
            "params": self.params,
        }

    def save(self, path: Path | str) -> Path:
        """Write a 16-bit 16 kHz mono WAV at ``path`` and the sidecar next to it (same name, .json).

        Both files appear by atomic rename, the sidecar first, so a WAV that exists always
        has its sidecar. Returns the WAV path.
        """
        import soundfile as sf

        wav = Path(path)
        wav.parent.mkdir(parents=True, exist_ok=True)
        with _atomic(wav.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(self.sidecar(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        with _atomic(wav) as tmp:
            sf.write(str(tmp), _to_pcm16(self.audio), self.sampling_rate, subtype="PCM_16", format="WAV")
        return wav

    @classmethod
    def load(cls, path: Path | str) -> Meeting:
        """Read a meeting written by :meth:`save`."""
        import soundfile as sf

        wav = Path(path)
        meta = json.loads(wav.with_suffix(".json").read_text(encoding="utf-8"))
        pcm, rate = sf.read(str(wav), dtype="int16", always_2d=False)
        if rate != meta["sampling_rate"]:
            raise ValueError(f"{wav}: {rate} Hz, sidecar says {meta['sampling_rate']}")
        return cls(
            audio=pcm.astype(np.float32) / 32768.0,
            sampling_rate=int(rate),
            reference=meta["reference"],
            clips=[PlacedClip(**c) for c in meta["clips"]],
            silence=(float(meta["silence"][0]), float(meta["silence"][1])),
            duration_s=float(meta["duration_s"]),
            language=meta.get("language", "en"),
            params=meta.get("params", {}),
        )


def meeting_cache_dir() -> Path:
    return paths.cache_dir() / "meetings"


def build_meeting(
    seed: int = 0,
    target_seconds: float | None = None,
    *,
    clip_ids: Sequence[str] = MEETING_CLIPS,
    speech_dbfs: float = -28.0,
    noise_dbfs: float = -48.0,
    silence_s: float = SILENCE_SECONDS,
    pause_range: tuple[float, float] = (1.0, 10.0),
    use_cache: bool = True,
) -> Meeting:
    """The meeting for these parameters: from the cache if built before, else built (and cached).

    ``target_seconds=None`` plays every clip once (about 3.5 minutes with the defaults);
    a number cycles the clips until that length (the 60 s silence included). The clips are
    fetched with :func:`whisperd_support.evaluation.fetch_clips` on first use.
    """
    params = _params(seed, target_seconds, clip_ids, speech_dbfs, noise_dbfs, silence_s, pause_range)
    if use_cache:
        wav = _cached_path(params)
        if wav.is_file() and wav.with_suffix(".json").is_file():
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
                return Meeting.load(wav)
    meeting = _build(params)
    if use_cache:
        with contextlib.suppress(OSError):  # a read-only cache must not stop a benchmark
            meeting.save(_cached_path(params))
    return meeting


def meeting_path(seed: int = 0, target_seconds: float | None = None, **kwargs: Any) -> Path:
    """Path of the cached WAV for these parameters (built and saved first if needed)."""
    kwargs.pop("use_cache", None)
    meeting = build_meeting(seed, target_seconds, use_cache=True, **kwargs)
    wav = _cached_path(meeting.params)
    if not wav.is_file():
        meeting.save(wav)
    return wav


# -- construction ------------------------------------------------------------------------


def _params(
    seed: int,
    target_seconds: float | None,
    clip_ids: Sequence[str],
    speech_dbfs: float,
    noise_dbfs: float,
    silence_s: float,
    pause_range: tuple[float, float],
) -> dict[str, Any]:
    from whisperd_support.evaluation.clips import load_manifest

    clip_ids = list(clip_ids)
    if not clip_ids:
        raise ValueError("no clips to build a meeting from")
    by_id = {s.id: s for s in load_manifest()}
    unknown = [i for i in clip_ids if i not in by_id]
    if unknown:
        raise KeyError(f"unknown dev clip id(s) {unknown}")
    low, high = float(pause_range[0]), float(pause_range[1])
    if not 2 * MARGIN_SECONDS <= low <= high:
        raise ValueError(f"pause_range {pause_range}: need {2 * MARGIN_SECONDS} <= low <= high")
    if silence_s <= 0:
        raise ValueError("silence_s must be positive")
    sources = [by_id[i] for i in clip_ids]
    # The manifest entries go into the key: a changed reference or package version rebuilds.
    manifest_digest = hashlib.sha256(
        json.dumps([[s.id, s.package, s.version, s.member, s.reference] for s in sources]).encode()
    ).hexdigest()[:16]
    return {
        "version": BUILD_VERSION,
        "seed": int(seed),
        "target_seconds": None if target_seconds is None else float(target_seconds),
        "clip_ids": clip_ids,
        "speech_dbfs": float(speech_dbfs),
        "noise_dbfs": float(noise_dbfs),
        "silence_s": float(silence_s),
        "pause_range": [low, high],
        "sampling_rate": SAMPLING_RATE,
        "manifest": manifest_digest,
    }


def _cached_path(params: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    target = params["target_seconds"]
    length = "once" if target is None else f"{int(round(target))}s"
    return meeting_cache_dir() / f"meeting-seed{params['seed']}-{length}-{digest}.wav"


class _Prepared(NamedTuple):
    clip_id: str
    reference: str
    samples: np.ndarray  # trimmed and level-normalised, including the margins
    lead: int  # samples of margin before the first speech frame
    speech: int  # samples from first to last speech frame


def _build(params: dict[str, Any]) -> Meeting:
    from whisperd.audio import decode_audio
    from whisperd_support.evaluation.clips import fetch_clips

    rate = params["sampling_rate"]
    rng = np.random.default_rng([_RNG_STREAM, params["seed"]])
    clips = fetch_clips(params["clip_ids"])
    prepared = {c.id: _prepare(c.id, c.reference, decode_audio(c.path, rate), rate, params["speech_dbfs"]) for c in clips}
    order_ids = list(dict.fromkeys(params["clip_ids"]))  # unique, in the given order

    low, high = params["pause_range"]
    silence_s = params["silence_s"]
    silence_gap = 2 * SILENCE_GUARD_SECONDS + silence_s
    lead_s = float(rng.uniform(*LEAD_RANGE))
    target = params["target_seconds"]

    # 1. The playing order and the pause before each clip (speech-to-speech seconds).
    sequence: list[tuple[_Prepared, float]] = []
    if target is None:
        for i, idx in enumerate(rng.permutation(len(order_ids))):
            sequence.append((prepared[order_ids[idx]], 0.0 if i == 0 else float(rng.uniform(low, high))))
    else:
        budget = float(target) - silence_gap - lead_s - TAIL_SECONDS
        used = 0.0
        while True:
            perm = [order_ids[i] for i in rng.permutation(len(order_ids))]
            if sequence and len(perm) > 1 and perm[0] == sequence[-1][0].clip_id:
                perm = perm[1:] + perm[:1]  # no clip straight after itself across cycles
            added = False
            for clip_id in perm:
                clip = prepared[clip_id]
                pause = 0.0 if not sequence else float(rng.uniform(low, high))
                if used + pause + clip.speech / rate <= budget:
                    sequence.append((clip, pause))
                    used += pause + clip.speech / rate
                    added = True
            if not added:
                break
        if len(sequence) < 2:
            raise ValueError(f"target_seconds={target} is too short for two clips and {silence_s:g} s of silence")

    # 2. Where the silence goes: the inner gap closest to the middle of the speech timeline.
    starts, t = [], 0.0
    for clip, pause in sequence:
        t += pause
        starts.append(t)
        t += clip.speech / rate
    middle = t / 2
    gap = min(range(1, len(sequence)), key=lambda i: abs(starts[i] - sequence[i][1] / 2 - middle)) if len(sequence) > 1 else 1

    # 3. Place speech on the timeline (sample positions), inserting the silent stretch.
    onsets: list[int] = []
    pos = int(round(lead_s * rate))
    silence_start = silence_end = 0
    for i, (clip, pause) in enumerate(sequence):
        if i == gap:
            silence_start = pos + int(round(SILENCE_GUARD_SECONDS * rate))
            silence_end = silence_start + int(round(silence_s * rate))
            pos = silence_end + int(round(SILENCE_GUARD_SECONDS * rate))
        elif i > 0:
            pos += int(round(pause * rate))
        onsets.append(pos)
        pos += clip.speech
    if len(sequence) == 1:  # silence after the only clip
        silence_start = pos + int(round(SILENCE_GUARD_SECONDS * rate))
        silence_end = silence_start + int(round(silence_s * rate))
        pos = silence_end
    total = pos + int(round(TAIL_SECONDS * rate))
    if target is not None:
        total = max(total, int(round(float(target) * rate)))

    # 4. Mix: noise everywhere, clips added on top.
    audio = _pink_noise(total, rng, params["noise_dbfs"])
    for (clip, _), onset in zip(sequence, onsets):
        begin = onset - clip.lead
        audio[begin : begin + len(clip.samples)] += clip.samples
    audio = _on_pcm16_grid(audio)

    placed = [
        PlacedClip(clip.clip_id, onset / rate, (onset + clip.speech) / rate, clip.reference)
        for (clip, _), onset in zip(sequence, onsets)
    ]
    return Meeting(
        audio=audio,
        sampling_rate=rate,
        reference=" ".join(c.reference for c in placed),
        clips=placed,
        silence=(silence_start / rate, silence_end / rate),
        duration_s=total / rate,
        language="en",
        params=params,
    )


def _prepare(clip_id: str, reference: str, audio: np.ndarray, rate: int, speech_dbfs: float) -> _Prepared:
    """Trim ``audio`` to its speech plus margins, fade the cut edges and set the speech level."""
    first, last, level_db = speech_bounds(audio)
    margin = int(round(MARGIN_SECONDS * rate))
    begin = max(0, first - margin)
    end = min(len(audio), last + margin)
    samples = audio[begin:end].astype(np.float64)
    gain_db = speech_dbfs - level_db
    peak = float(np.max(np.abs(samples))) if len(samples) else 0.0
    if peak > 0:
        gain_db = min(gain_db, -1.0 - 20 * math.log10(peak))
    samples *= 10 ** (gain_db / 20)
    fade = min(int(FADE_SECONDS * rate), len(samples) // 2)
    if fade:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0, math.pi, fade))
        samples[:fade] *= ramp
        samples[-fade:] *= ramp[::-1]
    return _Prepared(clip_id, " ".join(reference.split()), samples, first - begin, last - first)


def speech_bounds(audio: np.ndarray) -> tuple[int, int, float]:
    """(first speech sample, end of last speech sample, speech level in dBFS) of one clip.

    A 10 ms frame is speech when its energy is 12 dB over the clip's noise floor (10th
    percentile of frame energies) and no more than 40 dB under its loud frames (99th
    percentile); a boundary needs 50 ms of such frames in a row, so clicks do not count.
    The speech level is the median energy (dB) of the speech frames between those bounds.
    """
    n = len(audio) // _FRAME
    if n < _MIN_SPEECH_FRAMES:
        raise ValueError("clip too short to find speech in")
    frames = audio[: n * _FRAME].astype(np.float64).reshape(n, _FRAME)
    power = (frames**2).mean(axis=1)
    db = 10 * np.log10(power + 1e-12)
    threshold = max(np.percentile(db, 10) + 12.0, np.percentile(db, 99) - 40.0)
    loud = db > threshold
    runs = np.convolve(loud.astype(np.int32), np.ones(_MIN_SPEECH_FRAMES, np.int32), "valid") >= _MIN_SPEECH_FRAMES
    hits = np.flatnonzero(runs)
    if not len(hits):
        raise ValueError("no speech found in clip")
    first, last = int(hits[0]), int(hits[-1]) + _MIN_SPEECH_FRAMES
    level = float(np.median(db[first:last][loud[first:last]]))
    return first * _FRAME, last * _FRAME, level


def _pink_noise(n: int, rng: np.random.Generator, dbfs: float) -> np.ndarray:
    """``n`` samples of seeded pink noise (1/f power, nothing below 40 Hz) at ``dbfs`` RMS, float64."""
    size = _fast_length(n)
    spectrum = rng.standard_normal(size // 2 + 1) + 1j * rng.standard_normal(size // 2 + 1)
    freqs = np.fft.rfftfreq(size, 1 / SAMPLING_RATE)
    shape = np.zeros_like(freqs)
    band = freqs >= 40.0
    shape[band] = 1 / np.sqrt(freqs[band])
    noise = np.fft.irfft(spectrum * shape, size)[:n]
    rms = float(np.sqrt(np.mean(noise**2))) or 1.0
    return noise * (10 ** (dbfs / 20) / rms)


def _fast_length(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (FFT-friendly)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def _to_pcm16(audio: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(audio, np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def _on_pcm16_grid(audio: np.ndarray) -> np.ndarray:
    return _to_pcm16(audio).astype(np.float32) / 32768.0


@contextlib.contextmanager
def _atomic(target: Path):  # type: ignore[no-untyped-def]
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
