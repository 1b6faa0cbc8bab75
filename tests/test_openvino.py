"""The OpenVINO GenAI backend on a real Whisper model (whisper-base, int8 IR) and real recorded speech.

The IR export (~30-80 s on 2 cores) is cached under ~/.cache/whisperd/models/openvino and reused by
later runs; only the test that re-runs a real export on purpose is marked slow.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino_genai", reason="backend openvino needs: pip install -r requirements/openvino.txt")

from conftest import BASE_MODEL  # noqa: E402

from whisperd.audio import decode_audio  # noqa: E402
from whisperd.devices import UnsupportedSettingError, check_openvino_settings, openvino_available_devices  # noqa: E402
from whisperd.engine import Engine, TranscriptionError, create_engine  # noqa: E402
from whisperd.evaluation import DevClip, error_rate  # noqa: E402
from whisperd.models import openvino_export  # noqa: E402
from whisperd.models.openvino_export import ensure_openvino_model, export_dir, is_export_complete  # noqa: E402
from whisperd.options import DecodeOptions, EngineSettings  # noqa: E402

LIBRIVOX = [f"en_librivox_ss01_{n}" for n in ("0870", "0880", "0890", "0920", "0930")]
MANDARIN = ["zh_aishell1_BAC009S0764W0121", "zh_aishell1_BAC009S0764W0122"]
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]")

_ENGINES: dict[tuple[str, str], Engine] = {}


def load_ov_engine(precision: str = "int8", model: str = BASE_MODEL) -> Engine:
    key = (model, precision)
    if key not in _ENGINES:
        _ENGINES[key] = create_engine(EngineSettings(model=model, device="cpu", precision=precision, backend="openvino"))
    return _ENGINES[key]


@pytest.fixture(scope="module")
def ov_int8() -> Engine:
    return load_ov_engine("int8")


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


def test_mandarin_character_error_rate(ov_int8: Engine, clip: Callable[[str], DevClip]) -> None:
    clips = [clip(i) for i in MANDARIN]
    hyps = [transcribe(ov_int8, c, language="zh").text for c in clips]
    cer = error_rate([c.reference for c in clips], hyps, "zh")
    print(f"openvino int8: Mandarin CER {cer:.3f}")
    assert cer <= 0.35, hyps


def test_mandarin_translated_to_english(ov_int8: Engine, clip: Callable[[str], DevClip]) -> None:
    result = transcribe(ov_int8, clip(MANDARIN[0]), language="chinese", task="translate")
    assert result.language == "zh" and result.task == "translate"
    assert not CJK.search(result.text), result.text
    assert len(re.findall(r"[A-Za-z]+", result.text)) >= 3, result.text


@pytest.mark.parametrize(("clip_id", "expected"), [("es_mls_13697_11991_000000", "es"), ("sv_nst_u0016003", "sv")])
def test_auto_detects_language_with_a_probability(ov_int8: Engine, clip: Callable[[str], DevClip], clip_id: str,
                                                  expected: str) -> None:
    result = transcribe(ov_int8, clip(clip_id), language="auto")
    assert result.language == expected
    assert result.language_probability is not None and 0.5 < result.language_probability <= 1.0


def test_long_audio_windows_are_placed_in_the_file(ov_int8: Engine, clip: Callable[[str], DevClip]) -> None:
    """52 s, two recordings back to back: segments past 30 s, ordered, inside the file."""
    c = clip("en_mfa_michaelandsickmichael")
    result = transcribe(ov_int8, c, language="en")
    assert result.segments[-1].end > 45.0
    assert any(s.start > 30.0 for s in result.segments)
    assert error_rate([c.reference], [result.text], "en") < 0.2, result.text
    starts = [s.start for s in result.segments]
    assert starts == sorted(starts) and all(0 <= s.start <= s.end <= result.duration for s in result.segments)
    assert result.settings["backend"] == "openvino" and result.settings["precision"] == "int8"


def test_long_form_without_vad(ov_int8: Engine, clip: Callable[[str], DevClip]) -> None:
    c = clip("en_mfa_michaelandsickmichael")
    result = transcribe(ov_int8, c, language="en", vad=False)
    assert result.segments[-1].end > 45.0
    assert error_rate([c.reference], [result.text], "en") < 0.2, result.text


def test_word_timestamps_on_request(ov_int8: Engine, clip: Callable[[str], DevClip]) -> None:
    result = transcribe(ov_int8, clip("en_goforward"), language="en", word_timestamps=True)
    words = [w for s in result.segments for w in s.words]
    assert [w.text.lower().strip(".") for w in words] == ["go", "forward", "10", "meters"]
    for seg in result.segments:
        assert all(seg.start <= w.start <= w.end <= seg.end for w in seg.words)
    assert [w.start for w in words] == sorted(w.start for w in words)
    # Off by default: the plain pipeline gives no words.
    assert all(not s.words for s in transcribe(ov_int8, clip("en_goforward"), language="en").segments)


def test_empty_audio_gives_an_empty_transcript(ov_int8: Engine) -> None:
    result = ov_int8.transcribe(np.zeros(0, dtype=np.float32), DecodeOptions(language="en"))
    assert result.segments == () and result.duration == 0.0


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
