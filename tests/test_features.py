"""The NumPy log-mel features the OpenVINO backend uses equal transformers' WhisperFeatureExtractor."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from whisperd.audio import decode_audio
from whisperd.engine.features import log_mel_spectrogram
from whisperd.models import fetch_model


@pytest.mark.parametrize("clip_id", ["en_goforward", "zh_aishell1_BAC009S0764W0121"])
def test_features_match_transformers(clip, clip_id: str) -> None:  # noqa: ANN001 - conftest fixture
    extractor = WhisperFeatureExtractor.from_pretrained(str(fetch_model("openai/whisper-base")))
    audio = decode_audio(clip(clip_id).path)
    for piece in (audio, audio[:8000], np.zeros(0, dtype=np.float32)):
        expected = extractor(piece[:480000] if len(piece) else np.zeros(1, np.float32), sampling_rate=16000,
                             return_tensors="np").input_features.astype(np.float32)
        assert np.abs(log_mel_spectrogram(piece) - expected).max() < 1e-4
