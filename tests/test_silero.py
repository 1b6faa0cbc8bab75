"""whisperd.silero (no torch) against the silero-vad package itself, on real speech."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from silero_vad import load_silero_vad
from silero_vad.utils_vad import get_speech_timestamps_from_probs

from whisperd.audio import decode_audio
from whisperd.silero import CHUNK, SileroOnnx, speech_timestamps
from whisperd_support.evaluation import DevClip


def probabilities(model: Callable[[np.ndarray], np.ndarray], audio: np.ndarray) -> np.ndarray:
    steps = len(audio) // CHUNK
    return np.array([float(model(audio[None, i * CHUNK:(i + 1) * CHUNK])[0]) for i in range(steps)])


@pytest.mark.parametrize("clip_id", ["en_mfa_acoustic_corpus", "zh_aishell1_BAC009S0764W0121"])
def test_probabilities_and_speech_match_the_package(clip: Callable[[str], DevClip], clip_id: str) -> None:
    import torch

    audio = decode_audio(clip(clip_id).path)
    ours = SileroOnnx()
    theirs = load_silero_vad(onnx=True)
    mine = probabilities(ours, audio)
    reference = probabilities(lambda x: theirs(torch.from_numpy(x), 16000).numpy().reshape(-1), audio)
    assert np.abs(mine - reference).max() < 1e-5
    for options in ({"threshold": 0.3, "min_silence_duration_ms": 100, "speech_pad_ms": 200},
                    {"threshold": 0.5, "max_speech_duration_s": 3.0},
                    {"threshold": 0.3, "max_speech_duration_s": 1.2, "min_speech_duration_ms": 100}):
        expected = get_speech_timestamps_from_probs(reference.tolist(), sampling_rate=16000,
                                                    audio_length_samples=len(audio), **options)
        assert speech_timestamps(reference.tolist(), audio_length_samples=len(audio), **options) == expected


def test_decisions_match_on_random_probabilities() -> None:
    rng = np.random.default_rng(7)
    for _ in range(50):
        probs = np.clip(np.cumsum(rng.normal(0, 0.2, 400)) * 0.1 + 0.4, 0, 1).tolist()
        options = {"threshold": float(rng.uniform(0.2, 0.6)), "max_speech_duration_s": float(rng.uniform(1, 8)),
                   "min_silence_duration_ms": int(rng.integers(50, 400)), "speech_pad_ms": int(rng.integers(0, 300))}
        expected = get_speech_timestamps_from_probs(probs, sampling_rate=16000, audio_length_samples=400 * CHUNK,
                                                    **options)
        assert speech_timestamps(probs, audio_length_samples=400 * CHUNK, **options) == expected


def test_the_torch_model_for_gpus_gives_the_onnx_probabilities() -> None:
    """whisperd.silero_torch runs every stream's chunks at once; on the CPU here (on a GPU in
    production) it must decide exactly as the ONNX model stepped chunk by chunk."""
    from whisperd.silero_torch import SileroTorch
    from whisperd.vad import SpeechDetector, speech_probabilities
    from whisperd_support.evaluation.meeting import Meeting, meeting_path

    audio = Meeting.load(meeting_path(seed=0)).audio
    stepped = speech_probabilities([SileroOnnx()], audio)
    batched = speech_probabilities(SileroTorch("cpu"), audio)
    assert np.abs(stepped - batched).max() < 1e-4
    on_device = SpeechDetector(device="cpu")
    on_device._on_device = SileroTorch("cpu")  # the GPU path, on the CPU
    assert on_device.speech_spans(audio) == SpeechDetector().speech_spans(audio)
