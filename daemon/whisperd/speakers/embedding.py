"""Speaker embeddings over short sliding windows of speech, fed window by window as audio arrives.

The engine hands over its audio in order, one piece at a time (the VAD windows of a recording);
`SpeakerEmbedder.add` embeds the speech in each piece at once and keeps only 192 floats for every
0.75 s of speech, so a long recording never has to be held whole.  `SpeakerEmbedder.diarize`
clusters what was collected into speaker turns.

Windows are 1.5 s long every 0.75 s inside speech, as in 3D-Speaker's diarization recipe: long
enough for a stable voice print, short enough to catch quick exchanges.  Features are Kaldi-style
80-bin log-mel filter banks (kaldi-native-fbank), mean-normalised over each window as in CAM++'s
training.  The network runs on one thread (ONNX Runtime, or torch as a fallback), leaving the
other cores to Whisper.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from whisperd.speakers.weights import onnx_cache_path, save_quietly, verified_weights
from whisperd.transcript import SAMPLING_RATE

if TYPE_CHECKING:
    from whisperd.speakers.campplus import CAMPPlus

log = logging.getLogger(__name__)

FEATURE_DIM = 80      # fbank bins
EMBEDDING_SIZE = 192
FRAME_SHIFT = 160     # samples (10 ms)
FRAME_LENGTH = 400    # samples (25 ms)
WINDOW_SECONDS = 1.5
STEP_SECONDS = 0.75
# Speech shorter than this gives no embedding of its own (too little voice to go by); its time
# takes the speaker of the nearest window.
MIN_EMBED_SECONDS = 0.5
# Gaps shorter than this inside speech are bridged when cutting windows, so one utterance split by
# the VAD at a breath still gives full-length windows.
BRIDGE_GAP_SECONDS = 0.3
BATCH = 16


class Encoder(Protocol):
    """Fbank frames (batch, time, 80), float32 -> embeddings (batch, 192)."""

    def __call__(self, features: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class Turn:
    """A stretch of speech by one speaker, in seconds from the start of the recording."""

    start: float
    end: float
    speaker: str


@dataclass(frozen=True, slots=True)
class EmbeddedWindow:
    """One embedding: the samples [start, end) it was computed from, L2-normalised."""

    start: int
    end: int
    vector: np.ndarray


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's thread count is process-wide: set it for the block and put the old value back."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class TorchEncoder:
    """CAM++ in torch, one thread (used when the ONNX export is not available)."""

    def __init__(self, model: CAMPPlus) -> None:
        self.model = model
        self._lock = threading.Lock()

    def __call__(self, features: np.ndarray) -> np.ndarray:
        import torch

        with self._lock, torch_threads(1), torch.inference_mode():
            return self.model(torch.from_numpy(np.ascontiguousarray(features, np.float32))).numpy()


class OnnxEncoder:
    """CAM++ as an ONNX model, run by ONNX Runtime on one intra-op thread.

    Two to three times faster than torch on one core (measured on a 2-core x86-64: 11 against 21 ms
    a window in batches of 16), and its thread count is the session's own, not the process's.
    """

    def __init__(self, model: bytes) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"features": np.ascontiguousarray(features, np.float32)})[0]


def export_onnx(model: CAMPPlus) -> bytes:
    """The network as ONNX (batch and frame count dynamic); needs the onnx package."""
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its own deprecation
        # The exporter writes to a file object too (its documentation says so; its annotation does not).
        torch.onnx.export(model, (torch.zeros(2, 150, FEATURE_DIM),), buffer,  # type: ignore[arg-type]
                          input_names=["features"],
                          output_names=["embeddings"], opset_version=17, dynamo=False,
                          dynamic_axes={"features": {0: "batch", 1: "frames"}, "embeddings": {0: "batch"}})
    return buffer.getvalue()


def onnx_encoder(cache: Path | None) -> OnnxEncoder:
    """The ONNX encoder from `cache` if a good export is there; else exported now (2-6 s) and cached."""
    from whisperd.speakers.campplus import shared_campplus

    if cache is not None and cache.is_file():
        try:
            return OnnxEncoder(cache.read_bytes())
        except Exception as exc:  # noqa: BLE001 - a damaged file: export again
            log.warning("speaker model cache %s is unreadable (%s): exporting again", cache, exc)
    model = export_onnx(shared_campplus())
    encoder = OnnxEncoder(model)
    if cache is not None:
        save_quietly(cache, model)
    return encoder


_encoder: Encoder | None = None
_encoder_lock = threading.Lock()


def default_encoder() -> Encoder:
    """The process's CAM++ encoder, built on first use: ONNX Runtime if it can be had, else torch.

    The weights' digest is checked every time, even when the ONNX export comes from the cache.
    """
    global _encoder
    with _encoder_lock:
        if _encoder is None:
            verified_weights()
            try:
                _encoder = onnx_encoder(onnx_cache_path())
            except Exception as exc:  # noqa: BLE001 - no onnx package, an exporter change...: torch still works
                from whisperd.speakers.campplus import shared_campplus

                log.info("speaker model runs in torch (ONNX export failed: %s)", exc)
                _encoder = TorchEncoder(shared_campplus())
        return _encoder


def fbank(samples: np.ndarray) -> np.ndarray:
    """Kaldi-compatible 80-bin log-mel filter banks (25 ms frames every 10 ms, no dither), (frames, 80)."""
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = SAMPLING_RATE
    opts.mel_opts.num_bins = FEATURE_DIM
    computer = knf.OnlineFbank(opts)
    computer.accept_waveform(SAMPLING_RATE, np.ascontiguousarray(samples, np.float32))
    computer.input_finished()
    count = computer.num_frames_ready
    if count == 0:
        return np.zeros((0, FEATURE_DIM), np.float32)
    return np.stack([computer.get_frame(i) for i in range(count)]).astype(np.float32, copy=False)


def window_frames(frames: int, window: int, step: int, minimum: int) -> list[tuple[int, int]]:
    """[start, end) frame ranges of the sliding windows over `frames` frames.

    A stretch shorter than one window is one (shorter) window; the last window ends at the last
    frame, so the end of a long stretch is never left out.
    """
    if frames < minimum:
        return []
    if frames <= window:
        return [(0, frames)]
    ranges = [(s, s + window) for s in range(0, frames - window + 1, step)]
    if ranges[-1][1] < frames:
        ranges.append((frames - window, frames))
    return ranges


def _regions(spans: Iterable[tuple[int, int]], join_gap: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start - out[-1][1] <= join_gap:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _span_bounds(span: object) -> tuple[int, int]:
    if isinstance(span, tuple):
        return int(span[0]), int(span[1])
    return int(span.start), int(span.end)  # type: ignore[attr-defined]  # whisperd.vad.Span


class SpeakerEmbedder:
    """Collects speaker embeddings from a recording handed over piece by piece, then diarizes it.

    The model is loaded when the first speech arrives, so creating an embedder costs nothing.
    """

    def __init__(self, encoder: Encoder | None = None, *, window_seconds: float = WINDOW_SECONDS,
                 step_seconds: float = STEP_SECONDS, min_embed_seconds: float = MIN_EMBED_SECONDS,
                 bridge_gap_seconds: float = BRIDGE_GAP_SECONDS) -> None:
        self._encoder = encoder
        self.window = int(round(window_seconds * SAMPLING_RATE / FRAME_SHIFT))
        self.step = int(round(step_seconds * SAMPLING_RATE / FRAME_SHIFT))
        self.minimum = int(round(min_embed_seconds * SAMPLING_RATE / FRAME_SHIFT))
        self.bridge_gap = int(round(bridge_gap_seconds * SAMPLING_RATE))
        self.windows: list[EmbeddedWindow] = []
        self.speech: list[tuple[int, int]] = []  # the speech spans seen, in samples

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = default_encoder()
        return self._encoder

    def add(self, samples: np.ndarray, start_sample: int, spans: Iterable[object]) -> None:
        """Embed the speech in `samples`, which start at `start_sample` of the recording (16 kHz mono).

        `spans` are speech stretches in samples of the recording (whisperd.vad.Span or (start, end));
        the parts outside `samples` are ignored.  Pieces must come in order and not overlap.
        """
        samples = np.asarray(samples, np.float32).reshape(-1)
        stop = start_sample + len(samples)
        clipped = []
        for span in spans:
            a, b = _span_bounds(span)
            a, b = max(a, start_sample), min(b, stop)
            if b > a:
                clipped.append((a, b))
        if not clipped:
            return
        self.speech.extend(_regions(clipped, 0))
        jobs: list[tuple[int, int, np.ndarray]] = []
        for a, b in _regions(clipped, self.bridge_gap):
            feats = fbank(samples[a - start_sample:b - start_sample])
            for f0, f1 in window_frames(len(feats), self.window, self.step, self.minimum):
                window = feats[f0:f1]
                jobs.append((a + f0 * FRAME_SHIFT, a + (f1 - 1) * FRAME_SHIFT + FRAME_LENGTH,
                             window - window.mean(axis=0, keepdims=True)))
        for batch in _batches(jobs):
            vectors = self.encoder(np.stack([feats for _, _, feats in batch]))
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-8)
            for (a, b, _), vector in zip(batch, vectors, strict=True):
                self.windows.append(EmbeddedWindow(a, b, vector.astype(np.float32)))

    def diarize(self, num_speakers: int | None = None) -> list[Turn]:
        """Speaker turns over the speech seen so far: the speaker count is found unless given."""
        from whisperd.speakers.clustering import absorb_sandwiched, cluster_embeddings, make_turns

        if num_speakers is not None and num_speakers < 1:
            raise ValueError("num_speakers must be at least 1")
        if not self.windows:
            return make_turns(self.speech, [], np.zeros(0, int))
        labels = cluster_embeddings(np.stack([w.vector for w in self.windows]), num_speakers)
        if num_speakers is None:
            labels = absorb_sandwiched(self.windows, labels)
        return make_turns(self.speech, self.windows, labels)


def _batches(jobs: Sequence[tuple[int, int, np.ndarray]]) -> Iterator[list[tuple[int, int, np.ndarray]]]:
    """Equal-length windows together (most are full length), at most BATCH at a time."""
    by_length: dict[int, list[tuple[int, int, np.ndarray]]] = {}
    for job in jobs:
        by_length.setdefault(len(job[2]), []).append(job)
    for group in by_length.values():
        for i in range(0, len(group), BATCH):
            yield group[i:i + BATCH]


