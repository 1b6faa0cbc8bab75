"""Pick the compute device and refuse precision/device pairs that cannot run, before anything loads."""

from __future__ import annotations

from dataclasses import dataclass

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
# `precision: auto` per device: low-bit where ipex-llm has fast kernels, half precision on CUDA.
AUTO_PRECISION: dict[str, str] = {"xpu": "sym_int4", "cuda": "fp16", "cpu": "sym_int4"}


class UnsupportedSettingError(ValueError):
    """A device or precision that cannot run here; the message says what to use instead."""


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """What the backend will do: which device, and whether weights go through ipex-llm."""

    device: str
    precision: str
    use_ipex_llm: bool


def xpu_available() -> bool:
    import torch

    return bool(getattr(torch, "xpu", None)) and torch.xpu.is_available()


def cuda_available() -> bool:
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
