"""Whisper's log-mel features in NumPy, for backends that must not import torch or transformers.

The OpenVINO backend runs without torch; importing transformers' WhisperFeatureExtractor would pull
torch in (about a second and a half at start-up, on every `whisperd transcribe`). This computes the
same features: a centred STFT (reflect padding, periodic Hann window), power spectrum, Slaney-style
mel filters, log10, clamped to 8 below the maximum, scaled as (x + 4) / 4, over a 30 s input.
tests/test_features.py checks it against transformers' extractor.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from whisperd.transcript import SAMPLING_RATE

N_FFT = 400
HOP_LENGTH = 160
CHUNK_SAMPLES = 30 * SAMPLING_RATE


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above (librosa's htk=False)."""
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    mels = freq / f_sp
    log_region = freq >= min_log_hz
    return np.where(log_region, min_log_hz / f_sp + np.log(np.maximum(freq, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), f_sp * mels)


@lru_cache(maxsize=4)
def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) triangular filters with Slaney area normalisation."""
    fft_freqs = np.linspace(0, sampling_rate / 2, n_fft // 2 + 1)
    mel_points = np.linspace(_hz_to_mel(np.array(0.0)), _hz_to_mel(np.array(sampling_rate / 2)), n_mels + 2)
    hz_points = _mel_to_hz(mel_points)
    widths = np.diff(hz_points)
    slopes = hz_points[np.newaxis, :] - fft_freqs[:, np.newaxis]
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    return filters * (2.0 / (hz_points[2:] - hz_points[:-2]))[np.newaxis, :]


def log_mel_spectrogram(audio: np.ndarray, n_mels: int = 80) -> np.ndarray:
    """(1, n_mels, 3000) float32 features of the first 30 s of `audio` (zero-padded to 30 s)."""
    samples = np.zeros(CHUNK_SAMPLES, dtype=np.float64)
    clip = np.asarray(audio[:CHUNK_SAMPLES], dtype=np.float64)
    samples[: len(clip)] = clip
    padded = np.pad(samples, N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH]
    window = np.hanning(N_FFT + 1)[:-1]  # periodic
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    mel = power @ mel_filters(n_mels)
    log_spec = np.log10(np.maximum(mel, 1e-10)).T[:, :-1]
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0)[np.newaxis].astype(np.float32)
