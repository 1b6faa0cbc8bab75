"""Silero VAD in torch, for GPUs: the whole scan of a block in a few kernels instead of one ONNX
call per 32 ms step.

Silero is a convolutional front end (an STFT as a convolution, four 1-D convolutions) that sees
one 576-sample chunk at a time, followed by one LSTM cell that carries state from chunk to chunk.
Only the LSTM is sequential. So the front end runs on every chunk of every stream as one batch,
the LSTM runs over the streams' sequences in one cuDNN call, and the head on all outputs at once.
On the CPU, stepping the ONNX model from Python holds the interpreter's lock for every step; on a
GPU machine that made the scan most of a file's time (a 10-minute meeting: 0.9 s of VAD against
0.3 s of decoding on one H200). The weights are read from the package's TorchScript model, the
same network as its ONNX file (its `silero_vad_16k.safetensors` holds other weights);
tests/test_silero.py compares the probabilities with the ONNX model's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from whisperd.silero import CONTEXT, model_path

REFLECT_PAD = 64
HOP = 128
BINS = 129  # n_fft 256 // 2 + 1


# The 16 kHz network's weights in the TorchScript file, by the names used here.
JIT_NAMES = {
    "stft_conv.weight": "stft.forward_basis_buffer",
    **{f"conv{i + 1}.{kind}": f"encoder.{i}.reparam_conv.{kind}" for i in range(4) for kind in ("weight", "bias")},
    **{f"lstm_cell.{name}": f"decoder.rnn.{name}" for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")},
    "final_conv.weight": "decoder.decoder.2.weight",
    "final_conv.bias": "decoder.decoder.2.bias",
}


def load_weights(device: str) -> dict:
    """The 16 kHz model's tensors from the package's silero_vad.jit, on `device`."""
    import torch

    scripted = torch.jit.load(str(Path(model_path()).with_name("silero_vad.jit")), map_location=device)
    state = scripted._model.state_dict()
    return {ours: state[theirs].float().contiguous() for ours, theirs in JIT_NAMES.items()}


class SileroTorch:
    """Speech probabilities of many chunk streams at once, on a torch device."""

    def __init__(self, device: str = "cuda") -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.weights = load_weights(str(self.device))
        lstm = torch.nn.LSTM(128, 128, batch_first=True).to(self.device)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(lstm, f"{name}_l0").copy_(self.weights[f"lstm_cell.{name}"])
        self.lstm = lstm.eval()

    def __call__(self, chunks: np.ndarray) -> np.ndarray:
        """(streams, steps, 512) samples -> (streams, steps) speech probabilities, each stream
        starting from a fresh state with a silent context, as SileroOnnx after reset_states."""
        torch, w = self.torch, self.weights
        functional = torch.nn.functional
        streams, steps, size = chunks.shape
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(chunks, dtype=np.float32)).to(self.device)
            # Each chunk is preceded by the last CONTEXT samples of the one before it in its stream.
            context = functional.pad(x[:, :-1, -CONTEXT:], (0, 0, 1, 0))
            x = torch.cat([context, x], dim=2).reshape(streams * steps, 1, CONTEXT + size)
            x = functional.pad(x, (0, REFLECT_PAD), mode="reflect")
            x = functional.conv1d(x, w["stft_conv.weight"], stride=HOP)
            x = torch.sqrt(x[:, :BINS] ** 2 + x[:, BINS:] ** 2)
            x = functional.relu(functional.conv1d(x, w["conv1.weight"], w["conv1.bias"], padding=1))
            x = functional.relu(functional.conv1d(x, w["conv2.weight"], w["conv2.bias"], stride=2, padding=1))
            x = functional.relu(functional.conv1d(x, w["conv3.weight"], w["conv3.bias"], stride=2, padding=1))
            x = functional.relu(functional.conv1d(x, w["conv4.weight"], w["conv4.bias"], padding=1))
            hidden, _ = self.lstm(x.reshape(streams, steps, 128))
            out = torch.sigmoid(functional.relu(hidden) @ w["final_conv.weight"][0] + w["final_conv.bias"])
            return out.reshape(streams, steps).float().cpu().numpy()
