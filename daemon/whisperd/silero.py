"""Silero VAD without torch: its ONNX model on onnxruntime, and its probabilities-to-speech rules.

The silero-vad package ships the model (`silero_vad/data/silero_vad.onnx`, MIT) but wraps it in
torch tensors, and its helpers module imports torch at the top. The OpenVINO backend needs no torch
at all, and importing it costs about a second on every `whisperd transcribe`. So this module runs
the same ONNX file with NumPy state, and `speech_timestamps` is silero-vad 6.2.3's
`get_speech_timestamps_from_probs` (MIT, Silero Team), kept to the options whisperd uses
(16 kHz, samples out, best-silence cut at the maximum length). tests/test_silero.py checks both
against the package on real speech.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from whisperd.transcript import SAMPLING_RATE

CHUNK = 512  # samples per model step at 16 kHz
CONTEXT = 64  # samples of the previous step the model sees with each chunk


def model_path() -> str:
    """The ONNX file in the silero-vad wheel, found without importing the package (which imports torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the silero-vad package is not installed: pip install -r requirements/runtime.txt")
    return str(Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx")


class SileroOnnx:
    """The recurrent Silero model stepped over a batch of independent streams, 512 samples a step."""

    def __init__(self, path: str | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(path or model_path(), sess_options=options,
                                                    providers=["CPUExecutionProvider"])
        self.reset_states(1)

    def reset_states(self, batch_size: int) -> None:
        self._state = np.zeros((2, batch_size, 128), dtype=np.float32)
        self._context = np.zeros((batch_size, CONTEXT), dtype=np.float32)

    def __call__(self, chunk: np.ndarray) -> np.ndarray:
        """Speech probability of each stream's next (batch, 512) chunk."""
        x = np.concatenate([self._context, chunk.astype(np.float32, copy=False)], axis=1)
        out, self._state = self.session.run(None, {"input": x, "state": self._state,
                                                   "sr": np.array(SAMPLING_RATE, dtype=np.int64)})
        self._context = x[:, -CONTEXT:]
        return out.reshape(-1)


def speech_timestamps(probs: Any, *, audio_length_samples: int, threshold: float = 0.5,
                      min_speech_duration_ms: int = 250, max_speech_duration_s: float = float("inf"),
                      min_silence_duration_ms: int = 100, speech_pad_ms: int = 30,
                      min_silence_at_max_speech: int = 98) -> list[dict[str, int]]:
    """Speech stretches ({"start", "end"} in samples) from per-chunk probabilities, as Silero decides them."""
    min_speech = SAMPLING_RATE * min_speech_duration_ms / 1000
    pad = SAMPLING_RATE * speech_pad_ms / 1000
    max_speech = SAMPLING_RATE * max_speech_duration_s - CHUNK - 2 * pad
    min_silence = SAMPLING_RATE * min_silence_duration_ms / 1000
    min_silence_at_max = SAMPLING_RATE * min_silence_at_max_speech / 1000
    neg_threshold = max(threshold - 0.15, 0.01)

    triggered = False
    speeches: list[dict[str, int]] = []
    current: dict[str, int] = {}
    temp_end = prev_end = next_start = 0
    possible_ends: list[tuple[int, int]] = []
    for i, prob in enumerate(probs):
        sample = CHUNK * i
        if prob >= threshold and temp_end:
            if sample - temp_end > min_silence_at_max:
                possible_ends.append((temp_end, sample - temp_end))
            temp_end = 0
            if next_start < prev_end:
                next_start = sample
        if prob >= threshold and not triggered:
            triggered = True
            current["start"] = sample
            continue
        if triggered and sample - current["start"] > max_speech:
            if possible_ends:  # cut at the longest silence inside this stretch, and go on
                prev_end, duration = max(possible_ends, key=lambda end: end[1])
                current["end"] = prev_end
                speeches.append(current)
                current = {}
                next_start = prev_end + duration
                if next_start < prev_end + sample:
                    current["start"] = next_start
                else:
                    triggered = False
                prev_end = next_start = temp_end = 0
                possible_ends = []
            else:  # no silence to cut at: cut here
                current["end"] = sample
                speeches.append(current)
                current = {}
                prev_end = next_start = temp_end = 0
                triggered = False
                possible_ends = []
                continue
        if prob < neg_threshold and triggered:
            if not temp_end:
                temp_end = sample
            if sample - temp_end < min_silence:
                continue
            current["end"] = temp_end
            if current["end"] - current["start"] > min_speech:
                speeches.append(current)
            current = {}
            prev_end = next_start = temp_end = 0
            triggered = False
            possible_ends = []
    if current and audio_length_samples - current["start"] > min_speech:
        current["end"] = audio_length_samples
        speeches.append(current)

    for i, speech in enumerate(speeches):
        if i == 0:
            speech["start"] = int(max(0, speech["start"] - pad))
        if i != len(speeches) - 1:
            gap = speeches[i + 1]["start"] - speech["end"]
            if gap < 2 * pad:
                speech["end"] += int(gap // 2)
                speeches[i + 1]["start"] = int(max(0, speeches[i + 1]["start"] - gap // 2))
            else:
                speech["end"] = int(min(audio_length_samples, speech["end"] + pad))
                speeches[i + 1]["start"] = int(max(0, speeches[i + 1]["start"] - pad))
        else:
            speech["end"] = int(min(audio_length_samples, speech["end"] + pad))
    return speeches
