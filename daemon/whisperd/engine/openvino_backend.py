"""Whisper through OpenVINO GenAI (`openvino_genai.WhisperPipeline`) on Intel CPUs, GPUs and NPUs.

Intel's maintained route for Whisper on its hardware since ipex-llm and IPEX were archived. The
transformers model directory that `resolve_model` gives is exported once to OpenVINO IR with the
requested weight compression (whisperd.models.openvino_export); after that, loading takes well under
a second and running needs only openvino, openvino-genai and openvino-tokenizers.

What the pipeline does not have, and how whisperd deals with it:
- No VAD, temperature fallback, no-speech, logprob or compression-ratio gates; per-token scores are
  always 1.0. The WindowedEngine feeds it VAD windows of <= 30 s. The compression-ratio gate is
  computed here from each window's text (as OpenAI's Whisper computes it) and a window that fails
  it is decoded again at the next temperature, sampled with a seed of its own; when every
  temperature fails, the attempt that compresses least is kept (and the engine's loop guard cuts
  what is left of the loop). There is no log-probability or no-speech gate: the pipeline reports
  no scores, and scoring the tokens again would cost a second encoder pass per window.
- `condition_on_previous_text` cannot be switched: with VAD off, `decode_long_form` hands the whole
  file to the pipeline, which walks it in 30 s steps by its own rules.
- Language detection is not exposed with a probability. `detect_language` runs the exported encoder
  and one decoder step itself (compiled on first use) and takes the softmax over the language
  tokens, as transformers does.
- Not re-entrant ("Infer Request is busy"): one pipeline per backend, every call under a lock.
- Word timestamps must be switched on when the pipeline is built (and cost time on every call), so
  a second pipeline with them is built on the first job that asks for words, and used only for those.
- CPU pinning is off, so several pipelines (daemons, workers) share cores instead of stacking on the
  same ones; `threads` sets INFERENCE_NUM_THREADS.

Device: the OpenVINO name from devices.check_openvino_settings (CPU, GPU, GPU.1, NPU). Execution
precision is OpenVINO's default for the device (bf16 on CPUs with native bf16, f16 on GPUs); the
`precision` setting chooses the weight format of the IR (int8, int4, fp16, fp32).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from whisperd.devices import OpenVINOPlan
from whisperd.engine.features import log_mel_spectrogram
from whisperd.engine.guards import text_compression_ratio
from whisperd.options import DecodeOptions, EngineSettings
from whisperd.transcript import SAMPLING_RATE, Segment, Word

log = logging.getLogger(__name__)

WINDOW_SAMPLES = 30 * SAMPLING_RATE
MAX_AUTO_STREAMS = 4  # each pipeline holds its own copy of the weights (~80 MB for base at int8)


class _PipelinePool:
    """Pipelines lent to one thread at a time: WhisperPipeline is not re-entrant ("Infer Request is busy")."""

    def __init__(self, pipelines: list[Any]) -> None:
        self.pipelines = pipelines
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for pipeline in pipelines:
            self._free.put(pipeline)

    @contextlib.contextmanager
    def borrow(self) -> Iterator[Any]:
        pipeline = self._free.get()
        try:
            yield pipeline
        finally:
            self._free.put(pipeline)


def cpu_streams(settings: EngineSettings) -> tuple[int, int | None]:
    """(pipelines, threads each) on the CPU.

    A pipeline decodes one window at a time, one token after another; at batch 1 a token step is
    too small to keep several cores busy, so separate pipelines decoding separate windows side by
    side use the cores better than one pipeline spread over them (README, "Accuracy and speed").
    """
    cores = settings.threads or os.cpu_count() or 1
    streams = settings.streams or max(1, min(cores, MAX_AUTO_STREAMS))
    streams = min(streams, cores)
    return streams, max(1, cores // streams)


def pipeline_properties(device: str, threads: int | None) -> dict[str, Any]:
    """OpenVINO compile properties: CPU-only keys are passed only to the CPU plugin (others reject them)."""
    if device.split(".")[0] != "CPU":
        # GPU and NPU compile kernels at load (seconds to minutes); OpenVINO's model cache keeps them.
        # Not exercised here (no Intel GPU/NPU on the test machines).
        from whisperd import paths

        return {"CACHE_DIR": str(paths.models_dir() / "openvino" / ".compiled" / device)}
    props: dict[str, Any] = {"ENABLE_CPU_PINNING": False}
    if threads:
        props["INFERENCE_NUM_THREADS"] = int(threads)
    return props


class _LanguageDetector:
    """Encoder + one decoder step on the exported IR: a probability for every language token."""

    def __init__(self, ir_dir: Path, device: str, properties: dict[str, Any], lang_to_id: dict[str, int],
                 start_token: int) -> None:
        import openvino as ov

        core = ov.Core()
        self.n_mels = int(json.loads((ir_dir / "preprocessor_config.json").read_text()).get("feature_size", 80))
        self.encoder = core.compile_model(str(ir_dir / "openvino_encoder_model.xml"), device, properties)
        self.decoder = core.compile_model(str(ir_dir / "openvino_decoder_model.xml"), device, properties)
        self.encoder_request = self.encoder.create_infer_request()
        self.decoder_request = self.decoder.create_infer_request()
        self.codes = [token.strip("<|>") for token in lang_to_id]
        self.ids = np.array(list(lang_to_id.values()), dtype=np.int64)
        self.start = np.array([[start_token]], dtype=np.int64)

    def __call__(self, audio: np.ndarray) -> tuple[str, float]:
        features = log_mel_spectrogram(audio, self.n_mels)
        hidden = self.encoder_request.infer({"input_features": features})[self.encoder.output(0)]
        self.decoder_request.reset_state()
        out = self.decoder_request.infer({
            "input_ids": self.start,
            "encoder_hidden_states": hidden,
            "beam_idx": np.zeros(1, dtype=np.int32),
        })
        logits = np.asarray(out[self.decoder.output("logits")], dtype=np.float64)[0, -1, self.ids]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        best = int(np.argmax(probs))
        return self.codes[best], float(probs[best])


class OpenVINOBackend:
    """Long-lived WhisperPipeline decoding VAD windows one at a time."""

    def __init__(self, settings: EngineSettings, plan: OpenVINOPlan) -> None:
        import openvino_genai

        from whisperd.models import resolve_model
        from whisperd.models.openvino_export import ensure_openvino_model

        self.settings = settings
        self.plan = plan
        self.device = plan.device
        self._genai = openvino_genai
        started = time.perf_counter()
        self.model_dir = resolve_model(settings.model)
        self.ir_dir = ensure_openvino_model(self.model_dir, plan.precision)
        self.prepare_seconds = time.perf_counter() - started
        on_cpu = plan.device.split(".")[0] == "CPU"
        self.streams, stream_threads = cpu_streams(settings) if on_cpu else (1, settings.threads)
        self.properties = pipeline_properties(plan.device, stream_threads)
        started = time.perf_counter()
        self._pool = _PipelinePool([self._new_pipeline() for _ in range(self.streams)])
        self.pipeline = self._pool.pipelines[0]
        self.load_seconds = time.perf_counter() - started
        self.model = self.pipeline  # what WindowedEngine.model exposes for inspection
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(self.streams, thread_name_prefix="openvino") if self.streams > 1 else None
        self._word_pool: _PipelinePool | None = None
        self._detector: _LanguageDetector | None = None
        self._warned: set[str] = set()
        config = self.pipeline.get_generation_config()
        self.lang_to_id: dict[str, int] = dict(config.lang_to_id or {})
        self.is_multilingual = bool(config.is_multilingual) and bool(self.lang_to_id)
        self.decoder_start_token_id = int(config.decoder_start_token_id)
        log.info("model loaded", extra={"backend": "openvino", "ir_dir": str(self.ir_dir), "device": plan.device,
                                        "precision": plan.precision, "seconds": round(self.load_seconds, 2)})

    def describe(self) -> dict[str, object]:
        return {
            "backend": "openvino",
            "model": self.settings.model,
            "model_dir": str(self.model_dir),
            "openvino_model_dir": str(self.ir_dir),
            "device": self.device,
            "precision": self.plan.precision,
            "streams": self.streams,
            "openvino_genai": getattr(self._genai, "__version__", None),
        }

    # -- language ------------------------------------------------------------------------

    def detect_language(self, audio: np.ndarray) -> tuple[str, float]:
        """Most likely language of up to 30 s of audio, and its probability."""
        with self._lock:
            if self._detector is None:
                # The NPU compiles static shapes only; detection is one short step, the CPU does it.
                device = "CPU" if self.device.startswith("NPU") else self.device
                props = pipeline_properties(device, self.settings.threads)
                self._detector = _LanguageDetector(self.ir_dir, device, props, self.lang_to_id,
                                                   self.decoder_start_token_id)
            return self._detector(np.ascontiguousarray(audio, dtype=np.float32))

    # -- decoding ------------------------------------------------------------------------

    def decode_windows(self, windows: Sequence[np.ndarray], language: str, options: DecodeOptions) -> list[list[Segment]]:
        """One generate() per window (a pipeline takes one input at a time), on `streams` pipelines side
        by side; times relative to each window."""
        def decode(window: np.ndarray) -> list[Segment]:
            return self._generate(window, language, options, fallback=True) if len(window) else []

        if self._executor is None or len(windows) < 2:
            return [decode(window) for window in windows]
        return list(self._executor.map(decode, windows))

    def decode_long_form(self, audio: np.ndarray, language: str, options: DecodeOptions) -> list[Segment]:
        """The whole file; the pipeline steps through it 30 s at a time with its own seek rules."""
        if len(audio) == 0:
            return []
        return self._generate(audio, language, options)

    def _generate(self, audio: np.ndarray, language: str, options: DecodeOptions,
                  fallback: bool = False) -> list[Segment]:
        """Decode at the first temperature; with `fallback` (a window of <= 30 s), again at the next
        one while the text fails the compression-ratio gate. The whole file (long form) is decoded
        once: the pipeline walks it by its own rules, and one ratio over many windows means little."""
        samples = np.ascontiguousarray(audio, dtype=np.float32)
        duration = len(samples) / SAMPLING_RATE
        temperatures = options.temperatures if fallback and options.temperatures else options.temperatures[:1] or (0.0,)
        threshold = options.compression_ratio_threshold
        best: tuple[float, Any, float] | None = None
        with self._pool_for(options).borrow() as pipeline:
            for attempt, temperature in enumerate(temperatures):
                config = self._generation_config(pipeline, language, options, temperature,
                                                 seed=_window_seed(samples, attempt))
                result = pipeline.generate(samples, config)
                ratio = text_compression_ratio(" ".join(t.strip() for t in result.texts))
                if best is None or ratio < best[0]:
                    best = (ratio, result, temperature)
                if threshold is None or ratio <= threshold:
                    break
        assert best is not None
        _, result, temperature = best
        return [replace(seg, temperature=temperature)
                for seg in self._segments(result, duration, options.word_timestamps)]

    def _new_pipeline(self, **options: Any) -> Any:
        return self._genai.WhisperPipeline(str(self.ir_dir), self.device, **options, **self.properties)

    def _pool_for(self, options: DecodeOptions) -> _PipelinePool:
        if not options.word_timestamps:
            return self._pool
        with self._lock:
            if self._word_pool is None:
                started = time.perf_counter()
                self._word_pool = _PipelinePool([self._new_pipeline(word_timestamps=True) for _ in range(self.streams)])
                log.info("openvino word-timestamp pipelines loaded",
                         extra={"seconds": round(time.perf_counter() - started, 2)})
        return self._word_pool

    def _generation_config(self, pipeline: Any, language: str, options: DecodeOptions, temperature: float,
                           seed: int) -> Any:
        config = pipeline.get_generation_config()  # a copy: changing it does not touch the pipeline's
        config.return_timestamps = True
        config.word_timestamps = bool(options.word_timestamps)
        if self.is_multilingual:
            config.language = f"<|{language}|>"
            config.task = options.task
        config.num_beams = max(1, int(options.beam_size))
        config.initial_prompt = options.initial_prompt or None
        if temperature > 0.0:
            config.num_beams = 1
            config.do_sample = True
            config.temperature = float(temperature)
            config.rng_seed = seed
        if options.logprob_threshold is not None or options.no_speech_threshold is not None:
            self._warn_once("gates", "the openvino backend has no log-probability or no-speech gate (the "
                            "pipeline reports no scores); windows fall back on the compression-ratio gate only")
        return config

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.info(message, *args)

    @staticmethod
    def _segments(result: Any, duration: float, with_words: bool) -> list[Segment]:
        chunks = list(result.chunks or [])
        if not chunks:  # return_timestamps is always on, but be safe: one segment over the input
            text = " ".join(t.strip() for t in result.texts).strip()
            return [Segment(start=0.0, end=duration, text=text)] if text else []
        spans: list[tuple[float, float, str]] = []
        for chunk in chunks:
            start = max(0.0, float(chunk.start_ts))
            end = float(chunk.end_ts)
            if end < 0:  # an unfinished last segment has no end timestamp
                end = duration
            spans.append((start, max(end, start), chunk.text.strip()))
        words: list[list[Word]] = [[] for _ in spans]
        if with_words:
            for timing in result.words or []:
                index = _chunk_index(spans, float(timing.start_ts))
                words[index].append(Word(start=float(timing.start_ts), end=float(timing.end_ts),
                                         text=timing.word.strip()))
        return [Segment(start=s, end=e, text=t, words=tuple(w)) for (s, e, t), w in zip(spans, words)]


def _window_seed(samples: np.ndarray, attempt: int) -> int:
    """The seed of a sampled attempt: the same window gives the same transcript on every run."""
    return zlib.crc32(samples[:SAMPLING_RATE].tobytes() + attempt.to_bytes(2, "little"))


def _chunk_index(spans: list[tuple[float, float, str]], start: float) -> int:
    """The last segment starting at or before `start` (with 10 ms slack for rounding)."""
    index = 0
    for i, (s, _, _) in enumerate(spans):
        if s <= start + 0.01:
            index = i
    return index
