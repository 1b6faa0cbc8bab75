"""Pick the compute device and refuse precision/device pairs that cannot run, before anything loads."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from whisperd.errors import WhisperdError
from whisperd.options import DEVICES, PRECISIONS

# Weight formats that ipex-llm quantises on load. On the CPU only some have kernels.
IPEX_LOW_BIT: frozenset[str] = frozenset({"sym_int4", "asym_int4", "sym_int8", "woq_int4", "nf4", "fp4", "fp6", "fp8"})
IPEX_LOW_BIT_CPU: frozenset[str] = frozenset({"sym_int4", "asym_int4", "sym_int8", "woq_int4", "bf16"})
# What plain torch runs per device without ipex-llm.
TORCH_DTYPES: dict[str, frozenset[str]] = {
    "cpu": frozenset({"fp32"}),
    "cuda": frozenset({"fp32", "fp16", "bf16"}),
    "xpu": frozenset({"fp32"}),
}
# `precision: auto` per device: ipex-llm low-bit on Intel GPUs, half precision on CUDA, and fp32 on
# the CPU, where sym_int4 measured slower and a little less accurate (211 s meeting, whisper-base,
# 2-core EPYC: 8.3x real time at WER 0.067 against fp32's 12.9x at 0.059; see README).
AUTO_PRECISION: dict[str, str] = {"xpu": "sym_int4", "cuda": "fp16", "cpu": "fp32"}


class UnsupportedSettingError(WhisperdError, ValueError):
    """A device or precision that cannot run here; the message says what to use instead."""

    permanent = True


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """What the backend will do: which device, and whether weights go through ipex-llm."""

    device: str
    precision: str
    use_ipex_llm: bool


def _nvidia_driver_present() -> bool:
    return any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl"))


def _intel_gpu_present() -> bool:
    for vendor in glob.glob("/sys/class/drm/card*/device/vendor"):
        try:
            if open(vendor, encoding="ascii").read().strip().lower() == "0x8086":
                return True
        except OSError:
            continue
    return False


def xpu_available() -> bool:
    """An Intel GPU that PyTorch can use. Without an Intel GPU in /sys there is none, and torch
    (a second to import) is not asked: `whisperd transcribe` on a CPU-only machine never loads it."""
    if not _intel_gpu_present():
        return False
    import torch

    return bool(getattr(torch, "xpu", None)) and torch.xpu.is_available()


def cuda_available() -> bool:
    """A CUDA GPU that PyTorch can use; torch is imported only when an NVIDIA driver is present."""
    if not _nvidia_driver_present():
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device(requested: str) -> str:
    """`auto` means an Intel GPU if present, else CUDA, else the CPU; an explicit device must exist."""
    if requested not in DEVICES:
        raise UnsupportedSettingError(f"unknown device {requested!r}: use one of {', '.join(DEVICES)}")
    if requested == "auto":
        if xpu_available():
            return "xpu"
        return "cuda" if cuda_available() else "cpu"
    if requested == "xpu" and not xpu_available():
        raise UnsupportedSettingError(
            "device 'xpu' requested but no Intel GPU is visible to PyTorch (torch.xpu.is_available() is False): "
            "install the XPU builds of torch and intel-extension-for-pytorch and the Intel GPU driver, or use device: cpu"
        )
    if requested == "cuda" and not cuda_available():
        raise UnsupportedSettingError("device 'cuda' requested but torch.cuda.is_available() is False: use device: cpu")
    return requested


def plan_load(device: str, precision: str) -> LoadPlan:
    """Check that `precision` runs on the resolved `device` and say how it will be loaded."""
    if precision not in PRECISIONS:
        raise UnsupportedSettingError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = AUTO_PRECISION.get(device, "fp32")
    if device == "cpu":
        if precision in TORCH_DTYPES["cpu"]:
            return LoadPlan(device, precision, use_ipex_llm=False)
        if precision in IPEX_LOW_BIT_CPU:
            return LoadPlan(device, precision, use_ipex_llm=True)
        raise UnsupportedSettingError(
            f"precision {precision!r} needs an Intel GPU (ipex-llm has no CPU kernel for it); "
            f"on the CPU use one of: fp32, {', '.join(sorted(IPEX_LOW_BIT_CPU))}"
        )
    if device == "cuda":
        if precision in TORCH_DTYPES["cuda"]:
            return LoadPlan(device, precision, use_ipex_llm=False)
        raise UnsupportedSettingError(
            f"precision {precision!r} is an ipex-llm low-bit format for Intel GPUs and CPUs; "
            "on CUDA use fp16, bf16 or fp32"
        )
    if device == "xpu":
        if precision == "fp32":
            return LoadPlan(device, precision, use_ipex_llm=False)
        # ipex-llm runs every low-bit format, fp16 and bf16 on Intel GPUs.
        return LoadPlan(device, precision, use_ipex_llm=True)
    raise UnsupportedSettingError(f"unknown device {device!r}")


def check_settings(device: str, precision: str) -> LoadPlan:
    """Resolve the device and validate the precision in one step, without loading anything heavy."""
    return plan_load(resolve_device(device), precision)


# >>> openvino backend (backend: openvino) -------------------------------------------------------
# Our device names -> OpenVINO's. OpenVINO's own names (CPU, GPU, GPU.1, NPU) are accepted too.
OPENVINO_DEVICE_NAMES: dict[str, str] = {"cpu": "CPU", "xpu": "GPU", "gpu": "GPU", "npu": "NPU"}
# Measured on whisper-base, CPU: int8 is as accurate as fp16/fp32 IR and faster (see the backend's docstring).
OPENVINO_AUTO_PRECISION = "int8"


@dataclass(frozen=True, slots=True)
class OpenVINOPlan:
    """What the OpenVINO backend will load: an OpenVINO device name and an IR weight precision."""

    device: str  # as OpenVINO names it: CPU, GPU, GPU.1, NPU
    precision: str  # int8 | int4 | fp16 | fp32
    available: tuple[str, ...] = ()


def openvino_available_devices() -> tuple[str, ...]:
    """The devices OpenVINO's runtime sees (cheap: no model is read)."""
    try:
        import openvino
    except ImportError as exc:
        raise UnsupportedSettingError(
            f"backend 'openvino' needs the OpenVINO runtime ({exc}): pip install -r requirements/openvino.txt"
        ) from exc
    return tuple(openvino.Core().available_devices)


def check_openvino_settings(device: str, precision: str, available: tuple[str, ...] | None = None) -> OpenVINOPlan:
    """Map our device to OpenVINO's and validate it and the precision, before any export or load.

    auto -> the Intel GPU when OpenVINO sees one, else the CPU (the NPU only when asked for: it
    compiles static shapes and is a power saver rather than the fastest choice).
    """
    from whisperd.options import OPENVINO_DEVICES, OPENVINO_PRECISIONS

    if precision not in OPENVINO_PRECISIONS:
        raise UnsupportedSettingError(
            f"precision {precision!r} is not an OpenVINO weight format: with backend openvino use one of "
            f"{', '.join(OPENVINO_PRECISIONS)}"
        )
    if device.lower() == "cuda":
        raise UnsupportedSettingError(
            "backend 'openvino' runs on Intel CPUs, GPUs and NPUs, not CUDA: use backend transformers for device cuda"
        )
    devices = tuple(available) if available is not None else openvino_available_devices()
    wanted = device.strip()
    if wanted.lower() == "auto":
        ov_device = "GPU" if any(d == "GPU" or d.startswith("GPU.") for d in devices) else "CPU"
    else:
        ov_device = OPENVINO_DEVICE_NAMES.get(wanted.lower(), wanted.upper())
    family = ov_device.split(".")[0]
    present = ov_device in devices or (ov_device == family and any(d.startswith(f"{family}.") for d in devices))
    if not present:
        raise UnsupportedSettingError(
            f"device {device!r} (OpenVINO {ov_device}) is not available: OpenVINO reports "
            f"{', '.join(devices) or 'no devices'}; use one of {', '.join(OPENVINO_DEVICES)} "
            "or an OpenVINO device name from that list"
        )
    return OpenVINOPlan(device=ov_device, precision=OPENVINO_AUTO_PRECISION if precision == "auto" else precision,
                        available=devices)
# <<< openvino backend ---------------------------------------------------------------------------


def allowed_precisions(backend: str) -> tuple[str, ...]:
    """Precision names a backend takes (`auto` may resolve to either backend)."""
    from whisperd.options import OPENVINO_PRECISIONS

    return {"transformers": PRECISIONS, "openvino": OPENVINO_PRECISIONS}.get(
        backend, PRECISIONS + tuple(p for p in OPENVINO_PRECISIONS if p not in PRECISIONS))


def openvino_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino_genai") is not None


def resolve_backend(backend: str, device: str, precision: str) -> str:
    """`backend: auto` -> the runtime that is fastest for this device and precision.

    OpenVINO on the CPU: measured 5x the audio seconds per wall second of transformers fp32 at
    the same WER on whisper-base (benchmarks/speed.py, README). transformers everywhere else: CUDA,
    Intel GPUs through ipex-llm, and every ipex-llm low-bit format. OpenVINO's own formats (int8,
    int4) select it on any device; a machine without the OpenVINO packages falls back to
    transformers.
    """
    from whisperd.options import OPENVINO_PRECISIONS

    if backend != "auto":
        return backend
    if precision not in OPENVINO_PRECISIONS:
        return "transformers"
    if precision not in PRECISIONS:  # int8, int4: only OpenVINO has them
        return "openvino"
    if device == "auto":
        device = "xpu" if xpu_available() else "cuda" if cuda_available() else "cpu"
    return "openvino" if device == "cpu" and openvino_installed() else "transformers"


def check_engine_settings(backend: str, device: str, precision: str) -> LoadPlan | OpenVINOPlan:
    """The device/precision check of whichever backend is configured (before anything loads)."""
    from whisperd.options import BACKENDS

    backend = resolve_backend(backend, device, precision)
    if backend == "openvino":
        return check_openvino_settings(device, precision)
    if backend != "transformers":
        raise UnsupportedSettingError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    return check_settings(device, precision)
