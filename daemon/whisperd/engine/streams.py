"""CUDA streams of their own for the decoding thread and for each transcription beside it.

Work queued by different threads on CUDA's one default stream runs one after another, and each
thread's wait for its own results (a copy to the host) waits for everything queued before it: a
speech scan waits for the decoder's steps, and the decoder for the scans. On streams of their own
they wait only for their own work, and the GPU runs the scans' small kernels beside the decoder's.
Elsewhere (CPU, Intel GPU) these are no-ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def new_stream(device: str) -> Any:
    """A CUDA stream for `device`, or None where streams are not used."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.Stream(device=torch.device(device))


@contextlib.contextmanager
def on_stream(stream: Any) -> Iterator[None]:
    """Queue the calling thread's device work on `stream` (None: leave it where it is)."""
    if stream is None:
        yield
        return
    import torch

    with torch.cuda.stream(stream):
        yield


def wait_for_own_work(device: str) -> None:
    """Block until the calling thread's queued device work is done, so that tensors it made can be
    read on another stream (the decoder's)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.current_stream().synchronize()
