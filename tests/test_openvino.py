"""The OpenVINO GenAI backend's own parts on a real Whisper model (whisper-base, int8 IR) and real speech.

The IR export (~30-80 s on 2 cores) is cached under ~/.cache/whisperd/models/openvino and reused by
later runs; only the test that re-runs a real export on purpose is marked slow.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("openvino_genai", reason="backend openvino needs: pip install -r requirements/openvino.txt")


from whisperd.audio import decode_audio  # noqa: E402
from whisperd.devices import UnsupportedSettingError, check_openvino_settings, openvino_available_devices  # noqa: E402
from whisperd.engine import Engine, TranscriptionError, create_engine  # noqa: E402
from whisperd.models import openvino_export  # noqa: E402
from whisperd.models.openvino_export import ensure_openvino_model, export_dir, is_export_complete  # noqa: E402
from whisperd.options import DecodeOptions, EngineSettings  # noqa: E402
from whisperd_support.evaluation import DevClip, error_rate  # noqa: E402

LIBRIVOX = [f"en_librivox_ss01_{n}" for n in ("0870", "0880", "0890", "0920", "0930")]
# What both backends must do alike (languages, translation, long audio, word times) is tested once,
# over every engine, in tests/test_engine.py; this file has what only the OpenVINO backend has.


def transcribe(engine: Engine, c: DevClip, **options: object):
    return engine.transcribe(decode_audio(c.path), DecodeOptions(**options))  # type: ignore[arg-type]


# -- accuracy against the transformers reference ------------------------------------------------


def test_english_librivox_wer_matches_transformers_fp32(ov_int8: Engine, engine_fp32: Engine,
                                                        clip: Callable[[str], DevClip]) -> None:
    clips = [clip(i) for i in LIBRIVOX]
    refs = [c.reference for c in clips]
    ov_hyps = [transcribe(ov_int8, c, language="en").text for c in clips]
    pt_hyps = [transcribe(engine_fp32, c, language="en").text for c in clips]
    ov_wer, pt_wer = error_rate(refs, ov_hyps, "en"), error_rate(refs, pt_hyps, "en")
    print(f"LibriVox WER: openvino int8 {ov_wer:.3f}, transformers fp32 {pt_wer:.3f}")
    assert ov_wer <= pt_wer + 0.02, list(zip(ov_hyps, pt_hyps))


def test_long_form_without_vad(ov_int8: Engine, clip: Callable[[str], DevClip]) -> None:
    c = clip("en_mfa_michaelandsickmichael")
    result = transcribe(ov_int8, c, language="en", vad=False)
    assert result.segments[-1].end > 45.0
    assert error_rate([c.reference], [result.text], "en") < 0.2, result.text


def test_a_window_that_fails_the_compression_gate_is_decoded_again_hotter(ov_int8: Engine,
                                                                         clip: Callable[[str], DevClip]) -> None:
    """The pipeline has no gates of its own: whisperd computes the compression ratio from each
    window's text and decodes it again at the next temperature. A gate no text can pass (0.5) makes
    every temperature run; the attempt that compresses least is kept, sampled with a seed of the
    window's own, so the same file gives the same transcript again."""
    c = clip("en_librivox_ss01_0870")
    strict = {"language": "en", "compression_ratio_threshold": 0.5}
    first, again = transcribe(ov_int8, c, **strict), transcribe(ov_int8, c, **strict)
    greedy = transcribe(ov_int8, c, language="en")
    assert {seg.temperature for seg in greedy.segments} == {0.0}
    assert first.text == again.text
    assert all(seg.temperature is not None for seg in first.segments)
    assert all(seg.compression_ratio is not None for seg in first.segments)
    assert error_rate([c.reference], [first.text], "en") <= 0.3, first.text


# -- settings are checked before anything is exported or loaded -----------------------------------


@pytest.fixture()
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was resolved, exported or loaded before the settings were checked")

    import whisperd.models

    monkeypatch.setattr(whisperd.models, "resolve_model", refuse)
    monkeypatch.setattr(openvino_export, "ensure_openvino_model", refuse)


def test_unsupported_device_fails_before_loading_and_lists_devices(no_loading: None) -> None:
    available = openvino_available_devices()
    assert "CPU" in available
    missing = next(d for d in ("npu", "gpu", "GPU.7") if d.upper() not in available)
    for device in (missing, "tpu"):
        with pytest.raises(UnsupportedSettingError, match="not available") as err:
            create_engine(EngineSettings(backend="openvino", device=device, precision="int8"))
        assert f"OpenVINO reports {', '.join(available)}" in str(err.value)


def test_openvino_settings_are_validated(no_loading: None) -> None:
    with pytest.raises(UnsupportedSettingError, match="not CUDA"):
        create_engine(EngineSettings(backend="openvino", device="cuda"))
    with pytest.raises(UnsupportedSettingError, match="not an OpenVINO weight format"):
        create_engine(EngineSettings(backend="openvino", device="cpu", precision="sym_int4"))
    with pytest.raises(UnsupportedSettingError, match="unknown backend"):
        create_engine(EngineSettings(backend="onnx"))
    assert check_openvino_settings("auto", "auto", available=("CPU",)).device == "CPU"
    assert check_openvino_settings("auto", "auto", available=("CPU", "GPU.0", "GPU.1")).device == "GPU"
    assert check_openvino_settings("xpu", "int4", available=("CPU", "GPU")).device == "GPU"
    assert check_openvino_settings("GPU.1", "fp16", available=("CPU", "GPU.0", "GPU.1")).device == "GPU.1"
    assert check_openvino_settings("npu", "int8", available=("CPU", "NPU")).device == "NPU"
    assert check_openvino_settings("cpu", "auto", available=("CPU",)).precision == "int8"


# -- the export cache ----------------------------------------------------------------------------


def test_half_written_export_is_rebuilt(ov_int8: Engine, clip: Callable[[str], DevClip], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache dir without the completion marker is exported again; a finished one is reused.

    The exporter is replaced by a copy of the real (cached) export so this runs in seconds; the
    slow test below runs optimum-cli itself.
    """
    import openvino_genai

    source_ir: Path = ov_int8.backend.ir_dir  # type: ignore[attr-defined]
    model_dir: Path = ov_int8.backend.model_dir  # type: ignore[attr-defined]
    monkeypatch.setenv("WHISPERD_CACHE_DIR", str(tmp_path))
    target = export_dir(model_dir, "int8")
    assert tmp_path in target.parents
    target.mkdir(parents=True)
    (target / "openvino_encoder_model.xml").write_text("<net")  # cut off mid-write, no marker
    (target.parent / ".int8.tmp-99999-deadbeef").mkdir()  # staging dir of a killed export
    assert not is_export_complete(target)

    calls: list[Path] = []

    def fake_export(src: Path, out_dir: Path, precision: str, timeout: float = 0) -> None:
        calls.append(out_dir)
        for f in source_ir.iterdir():
            if not f.name.startswith("."):
                shutil.copy2(f, out_dir / f.name)

    monkeypatch.setattr(openvino_export, "run_export", fake_export)
    monkeypatch.setattr(openvino_export, "check_exporter", lambda python=None: None)
    assert ensure_openvino_model(model_dir, "int8") == target
    assert len(calls) == 1 and calls[0] != target  # written elsewhere, then renamed into place
    assert is_export_complete(target)
    marker = json.loads((target / ".whisperd-complete").read_text())
    assert marker["precision"] == "int8" and marker["source"] == str(model_dir.resolve())
    assert (target / "openvino_encoder_model.xml").stat().st_size == (source_ir / "openvino_encoder_model.xml").stat().st_size
    assert [p.name for p in target.parent.iterdir()] == ["int8"]  # staging dirs gone
    assert ensure_openvino_model(model_dir, "int8") == target and len(calls) == 1  # reused
    pipe = openvino_genai.WhisperPipeline(str(target), "CPU", ENABLE_CPU_PINNING=False)
    assert "forward" in pipe.generate(decode_audio(clip("en_goforward").path)).texts[0].lower()


def test_export_identity_follows_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHISPERD_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "my-whisper"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"x" * 10)
    first = export_dir(src, "int8")
    assert first.name == "int8" and first.parent.name.startswith("my-whisper-")
    assert export_dir(src, "int4").parent == first.parent
    (src / "model.safetensors").write_bytes(b"y" * 11)  # replaced weights: a new export
    assert export_dir(src, "int8") != first
    with pytest.raises(ValueError):
        export_dir(src, "sym_int4")


@pytest.mark.slow
def test_real_export_rebuilds_an_interrupted_cache(clip: Callable[[str], DevClip]) -> None:
    """optimum-cli for real (whisper-tiny.en, int8): a cache whose marker is gone is exported again,
    and the English-only model then refuses other languages."""
    from whisperd.models import resolve_model

    model_dir = resolve_model("openai/whisper-tiny.en")
    target = ensure_openvino_model(model_dir, "int8")
    created = json.loads((target / ".whisperd-complete").read_text())["created"]
    (target / ".whisperd-complete").unlink()  # as if the export had been killed before finishing
    (target / "openvino_decoder_model.xml").write_text("<net")
    assert not is_export_complete(target)
    assert ensure_openvino_model(model_dir, "int8") == target
    marker = json.loads((target / ".whisperd-complete").read_text())
    assert is_export_complete(target) and marker["versions"].get("optimum-intel")
    assert marker["created"] >= created and (target / "openvino_decoder_model.xml").stat().st_size > 1000

    engine = create_engine(EngineSettings(model="openai/whisper-tiny.en", device="cpu", precision="int8",
                                          backend="openvino"))
    audio = decode_audio(clip("en_goforward").path)
    assert "forward" in engine.transcribe(audio, DecodeOptions(language="auto")).text.lower()
    with pytest.raises(TranscriptionError, match="English-only"):
        engine.transcribe(audio, DecodeOptions(language="zh"))


def test_the_openvino_path_loads_neither_torch_nor_transformers(clip: Callable[[str], DevClip]) -> None:
    """Importing torch and transformers costs over a second on every `whisperd transcribe`."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from whisperd.engine import create_engine\n"
        "from whisperd.options import DecodeOptions, EngineSettings\n"
        "engine = create_engine(EngineSettings(backend='openvino', device='cpu', precision='int8'))\n"
        f"engine.transcribe_path(Path({str(clip('en_goforward').path)!r}), DecodeOptions(language='auto'))\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
