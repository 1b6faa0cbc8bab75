"""Settings for loading a model (EngineSettings) and for decoding one file (DecodeOptions)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

from whisperd.languages import normalize_language

DEVICES: tuple[str, ...] = ("auto", "xpu", "cuda", "cpu")
TASKS: tuple[str, ...] = ("transcribe", "translate")
PRECISIONS: tuple[str, ...] = (
    "auto", "fp32", "bf16", "fp16", "sym_int4", "asym_int4", "sym_int8", "woq_int4", "nf4", "fp4", "fp6", "fp8",
)
OUTPUT_FORMATS: tuple[str, ...] = ("txt", "srt", "vtt", "json", "rttm")
# auto: OpenVINO on the CPU when it is installed, transformers elsewhere (devices.resolve_backend).
BACKENDS: tuple[str, ...] = ("auto", "transformers", "openvino")
# backend: openvino takes these (xpu and gpu both mean the Intel GPU) or OpenVINO's own device names
# as `openvino.Core().available_devices` lists them (CPU, GPU, GPU.1, NPU), case-insensitive.
OPENVINO_DEVICES: tuple[str, ...] = ("auto", "cpu", "xpu", "gpu", "npu")
# Weight compression of the exported IR (auto = int8).
OPENVINO_PRECISIONS: tuple[str, ...] = ("auto", "int8", "int4", "fp16", "fp32")
# transformers backend: how windows are decoded. static = whisperd's batched static-cache decoder
# (CUDA graphs on NVIDIA GPUs), generate = transformers' generate(); auto = static, except for
# what only generate() does (beam search, word timestamps).
DECODERS: tuple[str, ...] = ("auto", "static", "generate")
# The model used when none is named: the one a fresh machine can obtain without the hub (see models/).
DEFAULT_MODEL = "openai/whisper-base"


def field_choices(info: FieldInfo) -> tuple[str, ...] | None:
    """The choices a setting's declaration lists (`json_schema_extra`), for its validator and its flag."""
    extra = info.json_schema_extra
    listed = extra.get("choices") if isinstance(extra, dict) else None
    return tuple(str(choice) for choice in listed) if isinstance(listed, list) else None


class EngineSettings(BaseModel):
    """How to load the model; changing any of these means loading it again.

    The one declaration of every engine setting: the config's `engine:` section is this model,
    and the command line's engine flags are made from its fields (whisperd.cli). Which device and
    precision go together is checked in one place, whisperd.devices (at config load for the static
    part, before loading for the hardware part).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: str = Field("auto", json_schema_extra={"choices": list(BACKENDS)},
                         description="auto (openvino on the CPU, transformers on CUDA and Intel GPUs), transformers or openvino")
    model: str = Field(DEFAULT_MODEL, description="hub id, a transformers folder, or a CTranslate2 (faster-whisper) folder")
    device: str = Field("auto", description=f"transformers: {', '.join(DEVICES)}; openvino: {', '.join(OPENVINO_DEVICES)} "
                                            "or an OpenVINO device name (GPU.1)")
    precision: str = Field("auto", description=f"transformers: {', '.join(PRECISIONS)}; openvino: "
                                               f"{', '.join(OPENVINO_PRECISIONS)}")
    threads: int | None = Field(None, ge=1, description="CPU threads for inference (default: all cores)")
    cpu_embedding: bool = Field(False, description="keep the embedding on the CPU (Intel integrated GPUs)")
    batch_size: int = Field(8, ge=1, description="speech windows decoded together")
    decoder: str = Field("auto", json_schema_extra={"choices": list(DECODERS)},
                         description="transformers: auto, static (batched static-cache decoder, CUDA graphs on NVIDIA "
                                     "GPUs) or generate (transformers' generate())")
    streams: int | None = Field(None, ge=1,
                                description="openvino on the CPU: windows decoded side by side by separate pipelines, "
                                            "threads shared out among them (default: one per core, at most 4)")

    def with_overrides(self, **changes: object) -> EngineSettings:
        """Copy with the given fields replaced (and type-checked); None values are ignored (unset CLI flags)."""
        return type(self).model_validate({**self.model_dump(), **{k: v for k, v in changes.items() if v is not None}})


@dataclass(frozen=True, slots=True)
class DecodeOptions:
    """How to decode one file; these come from folder rules and may differ per job."""

    language: str = "auto"
    task: str = "transcribe"
    initial_prompt: str | None = None
    beam_size: int = 1
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_previous_text: bool = True
    word_timestamps: bool = False
    speakers: str = "off"  # off | auto | N: label who speaks (whisperd.speakers)
    vad: bool = True
    drop_repeated_segments: bool = True
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "language", normalize_language(self.language))
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}: use one of {', '.join(TASKS)}")
