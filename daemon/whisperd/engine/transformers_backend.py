"""Whisper through transformers, with ipex-llm low-bit weights on Intel GPUs and CPUs.

The model is loaded once and reused for every file. The only device-specific step is the final
`.to(device)`: the CPU path runs the same code as the Intel GPU (xpu) and CUDA paths.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from whisperd.devices import LoadPlan
from whisperd.engine.device_features import LogMel
from whisperd.engine.shared_batches import RowStream, SharedBatches
from whisperd.engine.static_decoder import Prefix, StaticCacheDecoder, TokenRules
from whisperd.engine.streams import new_stream, on_stream, wait_for_own_work
from whisperd.engine.window_rules import FRAMES_PER_WINDOW, Attempt, Pass, Thresholds, decode_passes, pass_seed
from whisperd.languages import language_name
from whisperd.options import DecodeOptions, EngineSettings
from whisperd.transcript import SAMPLING_RATE, Segment, Word

log = logging.getLogger(__name__)

WINDOW_SAMPLES = 30 * SAMPLING_RATE
HOP_LENGTH = 160  # samples per log-mel frame
# Rows (window passes) of several recordings decoded together at most: a GPU keeps gaining up to
# about this batch for whisper-base (FACTS: 3540x at 8 windows, 19200x at 128).
SHARED_BATCH_ROWS = 128
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# Left in full precision by ipex-llm's low-bit formats (matched as substrings of module names):
# - the output head, tied to the token embedding;
# - the encoder. Its weights are read once per 30 s window, the decoder's once per token, so the
#   decoder is where low-bit weights save time and memory. The encoder is where they cost accuracy:
#   on the 211 s meeting (whisper-base, CPU) all-sym_int4 scored WER 0.082, encoder-fp32 0.067,
#   decoder-fp32 0.094, against 0.059 in fp32; encoder-fp32 also ran 2.2x faster than all-int4
#   (8.3x vs 3.8x real time: ipex-llm's CPU int4 kernels are slow on the encoder's long matrices).
NOT_QUANTISED: tuple[str, ...] = ("proj_out", "model.encoder.")


def load_whisper(model_dir: Path, plan: LoadPlan, cpu_embedding: bool = False) -> Any:
    """Load the weights as the plan says: ipex-llm low-bit (Intel's documented route) or plain torch.

    Returns transformers' WhisperForConditionalGeneration or ipex-llm's version of it (typed Any:
    its config and generation config are read by name, and neither library types them)."""
    if plan.use_ipex_llm:
        # ipex-llm's last-lm-head shortcut drops the logits that no-speech detection reads (IndexError).
        os.environ.setdefault("IPEX_LLM_LAST_LM_HEAD", "0")
        from ipex_llm.transformers import AutoModelForSpeechSeq2Seq

        model = AutoModelForSpeechSeq2Seq.from_pretrained(
            str(model_dir),
            load_in_low_bit=plan.precision,
            optimize_model=False,
            use_cache=True,
            cpu_embedding=cpu_embedding,
            modules_to_not_convert=list(NOT_QUANTISED),
        )
    else:
        from transformers import WhisperForConditionalGeneration

        model = WhisperForConditionalGeneration.from_pretrained(str(model_dir), torch_dtype=TORCH_DTYPES[plan.precision])
    if plan.device != "cpu":
        model = model.to(plan.device)
    model.config.forced_decoder_ids = None
    model.generation_config.forced_decoder_ids = None
    return model.eval()


def input_dtype(model: Any) -> torch.dtype:
    """The dtype the encoder's first convolution expects (bf16 weights need bf16 features)."""
    return model.get_encoder().conv1.weight.dtype


class TransformersBackend:
    """Long-lived Whisper model decoding batches of windows."""

    def __init__(self, settings: EngineSettings, plan: LoadPlan) -> None:
        from transformers import WhisperProcessor

        from whisperd.models import resolve_model

        self.settings = settings
        self.plan = plan
        self.device = plan.device
        if settings.threads:
            torch.set_num_threads(settings.threads)
        started = time.perf_counter()
        self.model_dir = resolve_model(settings.model)
        self.processor = WhisperProcessor.from_pretrained(str(self.model_dir))
        self.model = load_whisper(self.model_dir, plan, settings.cpu_embedding)
        self.load_seconds = time.perf_counter() - started
        self.generation_config = self.model.generation_config
        self.is_multilingual = bool(getattr(self.generation_config, "is_multilingual", False)) and bool(
            getattr(self.generation_config, "lang_to_id", None)
        )
        self.feature_dtype = input_dtype(self.model)
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self.static = self._static_decoder() if settings.decoder != "generate" else None
        # generate() decodes one caller's windows at a time: only the static decoder shares batches.
        self.shared_batches: SharedBatches[_Row, Attempt] | None = (
            SharedBatches(_StaticRows(self.static, new_stream(self.device)), SHARED_BATCH_ROWS)
            if self.static is not None else None)
        self.log_mel = LogMel(self.processor.feature_extractor.mel_filters, self.device)
        if self.device != "cpu":
            self.warm_up()
        log.info("model loaded", extra={"model_dir": str(self.model_dir), "seconds": round(self.load_seconds, 2)})

    def _static_decoder(self) -> StaticCacheDecoder:
        rules = TokenRules.from_generation_config(self.generation_config, int(self.model.config.vocab_size))
        return StaticCacheDecoder(self.model, rules, max_batch=max(SHARED_BATCH_ROWS, self.settings.batch_size))

    def warm_up(self) -> None:
        """Run every shape a job will use once, so the first file after start is as fast as the
        rest (on CUDA the first pass over a shape picks kernels; graphs are captured here)."""
        started = time.perf_counter()
        silence = [np.zeros(WINDOW_SAMPLES, dtype=np.float32)]
        if self.is_multilingual:
            self.detect_language(silence[0])
        if self.static is not None:
            # With graphs, every bucket the batch in flight can move through (rows of several
            # recordings share it), so that no capture runs beside a job; without, a job's own.
            top = self.static.max_batch if self.static.use_graphs else self.settings.batch_size
            sizes = {self.static.bucket(n) for n in range(1, top + 1)}
            self.static.warm_up(sorted(sizes), self.model.config.num_mel_bins)
            self.log_mel(silence * self.settings.batch_size)
        log.info("engine warmed up", extra={"seconds": round(time.perf_counter() - started, 2)})

    def describe(self) -> dict[str, object]:
        return {
            "backend": "transformers",
            "model": self.settings.model,
            "model_dir": str(self.model_dir),
            "device": self.device,
            "precision": self.plan.precision,
            "ipex_llm": self.plan.use_ipex_llm,
            "decoder": "generate" if self.static is None else f"static{'+cuda-graphs' if self.static.use_graphs else ''}",
        }

    # -- features -----------------------------------------------------------------------

    def _features(self, audio: np.ndarray | list[np.ndarray], long_form: bool = False) -> dict[str, torch.Tensor]:
        """Log-mel features for one file (long form) or a batch of <= 30 s windows, in one call."""
        extra: dict[str, Any] = {"truncation": False, "padding": "longest"} if long_form else {}
        if self.device == "cuda":
            extra["device"] = "cuda"  # the STFT of a batch of windows is worth moving to the GPU
        inputs = self.processor(audio, sampling_rate=SAMPLING_RATE, return_tensors="pt", return_attention_mask=True,
                                **extra)
        out = {"input_features": inputs.input_features.to(self.device, dtype=self.feature_dtype)}
        if long_form:
            out["attention_mask"] = inputs.attention_mask.to(self.device)
        return out

    # -- language ------------------------------------------------------------------------

    def detect_language(self, audio: np.ndarray) -> tuple[str, float]:
        """Most likely language of up to 30 s of audio, and its probability."""
        features = self._features(audio[:WINDOW_SAMPLES])["input_features"]
        lang_to_id: dict[str, int] = self.generation_config.lang_to_id
        ids = torch.tensor(list(lang_to_id.values()), device=self.device)
        start = torch.tensor([[self.generation_config.decoder_start_token_id]], device=self.device)
        with torch.inference_mode():
            encoded = self.model.get_encoder()(features)
            logits = self.model(encoder_outputs=encoded, decoder_input_ids=start).logits[0, -1]
            probs = torch.softmax(logits[ids].float(), dim=-1)
        best = int(torch.argmax(probs))
        return list(lang_to_id)[best].strip("<|>"), float(probs[best])

    # -- decoding ------------------------------------------------------------------------

    def decode_windows(self, windows: Sequence[np.ndarray], language: str, options: DecodeOptions) -> list[list[Segment]]:
        if self._static_applies(options):
            return self._decode_static(windows, language, options)
        inputs: dict[str, Any] = dict(self._features(list(windows)))
        if options.word_timestamps:
            # Align words only against each window's own frames, not the padding up to 30 s.
            inputs["num_frames"] = [max(1, len(w) // HOP_LENGTH) for w in windows]
        output = self._generate(inputs, language, options, long_form=False)
        return [[self._segment(raw, language) for raw in per_window] for per_window in output["segments"]]

    def _static_applies(self, options: DecodeOptions) -> bool:
        """The static decoder does greedy decoding with temperature fallback; beam search and word
        times (cross-attention weights for DTW) stay with generate()."""
        return self.static is not None and options.beam_size == 1 and not options.word_timestamps

    def _decode_static(self, windows: Sequence[np.ndarray], language: str,
                       options: DecodeOptions) -> list[list[Segment]]:
        features = self.log_mel(windows).to(self.feature_dtype)
        wait_for_own_work(self.device)  # the decoder reads them on its own stream
        prefix = self._prefix(language, options)
        assert self.shared_batches is not None
        passes = _PassStream(self.shared_batches.stream(), features, prefix, options.temperatures)
        thresholds = Thresholds(
            compression_ratio=options.compression_ratio_threshold, logprob=options.logprob_threshold,
            no_speech=options.no_speech_threshold if options.logprob_threshold is not None else None)
        assert self.static is not None  # _static_applies
        rules = self.static.rules
        found = decode_passes(len(windows), passes, options.temperatures, thresholds, rules.timestamp_begin, rules.eos,
                              rules.vocab_size)
        return [[self._segment({"tokens": list(seg.tokens), "start": seg.start, "end": seg.end}, language)
                 for seg in per_window] for per_window in found]

    def _prefix(self, language: str, options: DecodeOptions) -> Prefix:
        """What generate() puts before the first chosen token: [prompt], start-of-transcript,
        then language and task on a multilingual model."""
        config = self.generation_config
        start = [int(config.decoder_start_token_id)]
        if self.is_multilingual:
            start += [int(config.lang_to_id[f"<|{language}|>"]), int(config.task_to_id[options.task])]
        prompt = self._prompt_ids(options.initial_prompt).tolist() if options.initial_prompt else []
        return Prefix(tuple(prompt + start), sot_position=len(prompt))

    def decode_long_form(self, audio: np.ndarray, language: str, options: DecodeOptions) -> list[Segment]:
        long_form = len(audio) > WINDOW_SAMPLES
        inputs = self._features(audio, long_form=long_form)
        output = self._generate(inputs, language, options, long_form=long_form)
        return [self._segment(raw, language) for raw in output["segments"][0]]

    def _generate(self, inputs: dict[str, Any], language: str, options: DecodeOptions,
                  long_form: bool) -> dict[str, Any]:
        kwargs = self._generate_kwargs(language, options, long_form=long_form)
        with torch.inference_mode(), self._attention_weights(options.word_timestamps):
            return self.model.generate(**inputs, **kwargs)

    @contextmanager
    def _attention_weights(self, needed: bool) -> Iterator[None]:
        """Word times come from cross-attention weights, which only eager attention returns (SDPA
        does not); switch to it for the calls that ask for words, and back."""
        config = self.model.config
        previous = config._attn_implementation
        if needed and previous != "eager":
            config._attn_implementation = "eager"
        try:
            yield
        finally:
            config._attn_implementation = previous

    def _generate_kwargs(self, language: str, options: DecodeOptions, long_form: bool) -> dict[str, Any]:
        temperatures = options.temperatures
        kwargs: dict[str, Any] = {
            "return_timestamps": True,
            "return_segments": True,
            "temperature": temperatures if len(temperatures) > 1 else temperatures[0],
            "compression_ratio_threshold": options.compression_ratio_threshold,
            "logprob_threshold": options.logprob_threshold,
            # transformers reads no-speech probability only alongside the logprob gate.
            "no_speech_threshold": options.no_speech_threshold if options.logprob_threshold is not None else None,
            "num_beams": options.beam_size,
        }
        if options.word_timestamps:
            kwargs["return_token_timestamps"] = True  # DTW over the alignment heads' cross-attention
        if long_form:
            kwargs["condition_on_prev_tokens"] = options.condition_on_previous_text
        if self.is_multilingual:
            kwargs["language"] = language
            kwargs["task"] = options.task
        if options.initial_prompt:
            kwargs["prompt_ids"] = self._prompt_ids(options.initial_prompt)
        return kwargs

    def _prompt_ids(self, prompt: str) -> torch.Tensor:
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = self.processor.get_prompt_ids(prompt, return_tensors="pt").to(self.device)
        return self._prompt_cache[prompt]

    def _segment(self, raw: dict[str, Any], language: str) -> Segment:
        text = self.processor.tokenizer.decode(raw["tokens"], skip_special_tokens=True)
        start, end = float(raw["start"]), float(raw["end"])
        words = self._words(raw, language, end) if "token_timestamps" in raw else ()
        return Segment(start=start, end=end, text=text.strip(), words=words)

    def _words(self, raw: dict[str, Any], language: str, segment_end: float) -> tuple[Word, ...]:
        """Group the segment's text tokens into words; token i spans times[i] .. times[i + 1], as
        in transformers' own word-level pipeline output. Splitting follows Whisper's rules (spaces,
        or every character for Chinese, Japanese, Thai ...)."""
        from transformers.models.whisper.tokenization_whisper import _combine_tokens_into_words

        tokens = [int(t) for t in raw["tokens"]]
        times = [float(t) for t in raw["token_timestamps"]]
        text_ids = [i for i, token in enumerate(tokens) if token < self.generation_config.eos_token_id]
        if not text_ids:
            return ()
        words, _, groups = _combine_tokens_into_words(
            self.processor.tokenizer, [tokens[i] for i in text_ids], language_name(language))
        out = []
        for word, group in zip(words, groups):
            first, last = text_ids[group[0]], text_ids[group[-1]]
            start = times[first]
            end = times[last + 1] if last + 1 < len(times) else segment_end
            if word.strip():
                out.append(Word(start=start, end=max(start, end), text=word.strip()))
        return tuple(out)


class _PassStream:
    """Passes over one call's windows, decoded as rows beside other callers' (a `PassQueue`)."""

    def __init__(self, rows: RowStream[_Row, Attempt], features: torch.Tensor, prefix: Prefix,
                 temperatures: Sequence[float]) -> None:
        self._rows, self._features, self._prefix, self._temperatures = rows, features, prefix, temperatures

    def submit(self, passes: Sequence[Pass]) -> None:
        self._rows.submit([_Row(self._features[p.window], p.seek, self._prefix, self._temperatures[p.attempt],
                                pass_seed(p)) for p in passes], passes)

    def completed(self) -> Iterator[tuple[Pass, Attempt]]:
        for task, attempt in self._rows.completed():
            assert isinstance(task, Pass)
            yield task, attempt


class _StaticRows:
    """The static-cache decoder as a `RowDecoder` of passes, queued on the decoder's own stream (see
    streams). Only SharedBatches' decoding thread calls it. The graphs are captured before the first
    job (warm_up), in thread-local capture mode, so other threads' device work (features, language,
    the speech scan) runs beside it."""

    def __init__(self, static: StaticCacheDecoder, stream: Any) -> None:
        self._static, self._stream = static, stream

    @property
    def room(self) -> int:
        return self._static.room

    @property
    def occupied(self) -> int:
        return self._static.occupied

    def admit(self, rows: Sequence[_Row], tags: Sequence[object]) -> None:
        with on_stream(self._stream):
            if self._stream is not None:
                for row in rows:  # made on the caller's stream: not to be reused while read here
                    row.features.record_stream(self._stream)
            batch = torch.stack([_from_frame(row.features, row.seek) for row in rows])
            self._static.admit(batch, [row.prefix for row in rows], [row.temperature for row in rows], tags,
                               seeds=[row.seed for row in rows])

    def advance(self) -> list[tuple[object, Attempt]]:
        with on_stream(self._stream):
            return self._static.advance()

    def drop(self) -> None:
        with on_stream(self._stream):
            self._static.drop()


@dataclass(frozen=True, slots=True)
class _Row:
    """One pass over one window: its features (on the device), from which frame, after which
    prefix, at which temperature, with which seed for sampling."""

    features: torch.Tensor
    seek: int
    prefix: Prefix
    temperature: float
    seed: int


def _from_frame(features: torch.Tensor, frame: int) -> torch.Tensor:
    """A window's features from `frame` on, zero-padded back to 30 s (what generate() decodes when
    it continues a window after its last complete segment)."""
    if frame == 0:
        return features
    return torch.nn.functional.pad(features[:, frame:], (0, frame))[:, :FRAMES_PER_WINDOW]
