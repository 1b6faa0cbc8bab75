"""Inference engines behind one small interface, so a backend can be swapped without touching the daemon."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from whisperd.engine.pipeline import JOBS_AT_ONCE_SHARED, Progress, ProgressCallback, TranscriptionError
from whisperd.options import DecodeOptions, EngineSettings
from whisperd.transcript import Transcript

T = TypeVar("T")
R = TypeVar("R")


class Engine(Protocol):
    """A loaded model that turns 16 kHz mono float32 samples, or an audio file, into a Transcript."""

    settings: EngineSettings
    device: str

    def transcribe(self, audio: np.ndarray, options: DecodeOptions, *,
                   progress: ProgressCallback | None = None) -> Transcript: ...

    def transcribe_path(self, path: Path | str, options: DecodeOptions, *,
                        progress: ProgressCallback | None = None) -> Transcript:
        """The same transcript as `transcribe(decode_audio(path), ...)`, without holding the whole file.

        `progress` is called once the duration is known, as decoding moves through the file, and at the end.
        """
        ...

    def side_by_side(self, items: Sequence[T], work: Callable[[T], R], *,
                     at_once: int = JOBS_AT_ONCE_SHARED) -> Iterator[R | Exception]:
        """`work(item)` for each item in threads whose windows share decode batches where the
        backend can; each result, or the exception that failed it, in input order."""
        ...

    def sharing(self) -> AbstractContextManager[None]:
        """Around one transcription run in its own thread beside others (see side_by_side)."""
        ...

    @property
    def jobs_at_once(self) -> int:
        """How many recordings to hand this engine at once (1 unless they share batches)."""
        ...

    def describe(self) -> dict[str, object]: ...


def create_engine(settings: EngineSettings) -> Engine:
    """Validate the settings (cheap, before any weights load), then load the model once."""
    from whisperd.devices import OpenVINOPlan, check_engine_settings, resolve_backend
    from whisperd.engine.pipeline import WindowedEngine

    settings = settings.with_overrides(backend=resolve_backend(settings.backend, settings.device, settings.precision))
    plan = check_engine_settings(settings.backend, settings.device, settings.precision)
    if isinstance(plan, OpenVINOPlan):
        from whisperd.engine.openvino_backend import OpenVINOBackend

        return WindowedEngine(OpenVINOBackend(settings, plan), settings, plan.device)
    from whisperd.engine.transformers_backend import TransformersBackend

    return WindowedEngine(TransformersBackend(settings, plan), settings, plan.device)


__all__ = ["Engine", "Progress", "ProgressCallback", "TranscriptionError", "create_engine"]
