"""Precision and device checks happen before any weights load, with the message a user needs."""

from __future__ import annotations

import pytest

from whisperd.devices import UnsupportedSettingError, check_settings, plan_load, resolve_backend
from whisperd.languages import UnknownLanguageError, normalize_language
from whisperd.options import DecodeOptions


@pytest.mark.parametrize("precision", ["nf4", "fp4", "fp6", "fp8", "fp16"])
def test_intel_gpu_only_formats_are_refused_on_cpu(precision: str) -> None:
    with pytest.raises(UnsupportedSettingError, match="needs an Intel GPU") as err:
        plan_load("cpu", precision)
    assert "sym_int4" in str(err.value)  # tells what works instead


@pytest.mark.parametrize("precision", ["sym_int4", "asym_int4", "sym_int8", "woq_int4", "bf16"])
def test_cpu_low_bit_formats_go_through_ipex_llm(precision: str) -> None:
    plan = plan_load("cpu", precision)
    assert plan.use_ipex_llm and plan.device == "cpu" and plan.precision == precision


def test_fp32_on_cpu_is_plain_torch() -> None:
    assert not plan_load("cpu", "fp32").use_ipex_llm


@pytest.mark.parametrize("precision", ["sym_int4", "nf4", "fp8", "sym_int8"])
def test_ipex_formats_are_refused_on_cuda(precision: str) -> None:
    with pytest.raises(UnsupportedSettingError, match="on CUDA use fp16, bf16 or fp32"):
        plan_load("cuda", precision)


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_cuda_half_precision_is_plain_torch(precision: str) -> None:
    assert not plan_load("cuda", precision).use_ipex_llm


@pytest.mark.parametrize("precision", ["sym_int4", "nf4", "fp8", "fp16", "bf16", "fp6"])
def test_every_low_bit_format_is_planned_for_intel_gpu(precision: str) -> None:
    """The XPU plan (not runnable here: no Intel GPU) loads through ipex-llm, then `.to('xpu')`."""
    plan = plan_load("xpu", precision)
    assert plan.use_ipex_llm and plan.device == "xpu"


def test_auto_precision_per_device() -> None:
    assert plan_load("cpu", "auto").precision == "fp32"
    assert plan_load("cuda", "auto").precision == "fp16"
    assert plan_load("xpu", "auto").precision == "sym_int4"


def test_missing_devices_are_reported_before_loading() -> None:
    import torch

    if not torch.xpu.is_available():
        with pytest.raises(UnsupportedSettingError, match="no Intel GPU"):
            check_settings("xpu", "sym_int4")
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedSettingError, match="cuda"):
            check_settings("cuda", "fp16")
        assert check_settings("auto", "auto").device in ("cpu", "xpu")


def test_unknown_precision_and_device() -> None:
    with pytest.raises(UnsupportedSettingError, match="unknown precision"):
        plan_load("cpu", "int3")
    with pytest.raises(UnsupportedSettingError, match="unknown device"):
        check_settings("tpu", "fp32")


@pytest.mark.parametrize(("given", "code"), [("zh", "zh"), ("chinese", "zh"), ("Mandarin", "zh"), ("EN", "en"),
                                             ("english", "en"), ("auto", "auto"), (None, "auto"), ("swedish", "sv")])
def test_language_codes_and_names(given: str | None, code: str) -> None:
    assert normalize_language(given) == code


def test_unknown_language_code() -> None:
    with pytest.raises(UnknownLanguageError, match="unknown language 'xx'"):
        DecodeOptions(language="xx")
    with pytest.raises(ValueError, match="unknown task"):
        DecodeOptions(task="summarise")


def test_language_table_matches_transformers() -> None:
    """The copied table (kept so config validation does not import torch) equals Whisper's own."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    from whisperd import language_table

    assert language_table.LANGUAGES == LANGUAGES
    assert language_table.TO_LANGUAGE_CODE == TO_LANGUAGE_CODE


@pytest.mark.parametrize(("device", "precision", "expected"), [
    ("cpu", "auto", "openvino"),  # the faster CPU runtime (benchmarks/speed.py)
    ("cpu", "fp32", "openvino"),
    ("cpu", "int8", "openvino"),
    ("cpu", "sym_int4", "transformers"),  # ipex-llm formats stay on ipex-llm
    ("cpu", "bf16", "transformers"),
    ("cuda", "auto", "transformers"),
    ("cuda", "fp16", "transformers"),
    ("xpu", "auto", "transformers"),  # Intel GPUs: ipex-llm low-bit by default
    ("xpu", "int4", "openvino"),  # OpenVINO's own formats select it anywhere
])
def test_auto_backend_per_device_and_precision(device: str, precision: str, expected: str) -> None:
    assert resolve_backend("auto", device, precision) == expected


def test_auto_backend_follows_the_device_that_auto_finds(monkeypatch: pytest.MonkeyPatch) -> None:
    import whisperd.devices as devices

    assert resolve_backend("auto", "auto", "auto") == "openvino"  # this machine: CPU only
    # Stands in for an NVIDIA GPU, which the test machines do not have.
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    assert resolve_backend("auto", "auto", "auto") == "transformers"


def test_auto_backend_without_openvino_installed_is_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    import whisperd.devices as devices

    # Stands in for a machine set up without requirements/openvino.txt (this one has it installed).
    monkeypatch.setattr(devices, "openvino_installed", lambda: False)
    assert resolve_backend("auto", "cpu", "auto") == "transformers"
    assert resolve_backend("transformers", "cpu", "int8") == "transformers"  # explicit choice is kept
