"""Whisper's log-mel features computed with torch on the model's device.

The same computation as transformers' WhisperFeatureExtractor (centred STFT with a periodic Hann
window, power spectrum, its mel filters, log10 clamped to 8 below each window's maximum, scaled as
(x + 4) / 4), but the features stay where the model is: on a GPU a batch of windows costs one
upload of samples instead of a host STFT and an upload of features.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from whisperd.transcript import SAMPLING_RATE

N_FFT = 400
HOP_LENGTH = 160
WINDOW_SAMPLES = 30 * SAMPLING_RATE


class LogMel:
    """Features of batches of <= 30 s windows, zero-padded to 30 s, on `device`."""

    def __init__(self, mel_filters: np.ndarray, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.filters = torch.from_numpy(np.asarray(mel_filters, dtype=np.float32)).T.contiguous().to(self.device)
        self.window = torch.hann_window(N_FFT, device=self.device)

    def __call__(self, windows: Sequence[np.ndarray]) -> torch.Tensor:
        """(len(windows), n_mels, 3000) float32."""
        host = torch.zeros(len(windows), WINDOW_SAMPLES, dtype=torch.float32,
                           pin_memory=self.device.type == "cuda")
        for row, samples in enumerate(windows):
            clip = np.asarray(samples[:WINDOW_SAMPLES], dtype=np.float32)
            host[row, :len(clip)] = torch.from_numpy(clip)
        audio = host.to(self.device, non_blocking=True)
        stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=self.window, return_complex=True)
        power = stft[..., :-1].abs() ** 2
        log_spec = torch.clamp(self.filters @ power, min=1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0
