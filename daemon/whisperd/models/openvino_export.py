"""Export a transformers Whisper directory to OpenVINO IR, once per model and weight precision.

The OpenVINO backend runs `openvino_genai.WhisperPipeline` on IR files (encoder, stateful decoder,
tokenizer and detokenizer models). Producing them needs optimum-intel and nncf (torch tracing plus
weight compression; ~30 s and ~2 GB RAM for whisper-base); running them needs only openvino,
openvino-genai and openvino-tokenizers.

The export runs `optimum-cli export openvino` in a child process: the daemon's memory goes back to
the system when it ends, and process-wide patches (ipex-llm patches transformers' generate and
LayerNorm at import) cannot leak into the trace. By default the child is this interpreter
(requirements/openvino-export.txt installs next to the runtime set); WHISPERD_OPENVINO_EXPORT_PYTHON
names another interpreter, e.g. of a separate virtual environment.

Layout: ``models_dir()/openvino/<model name>-<identity>/<precision>/``, where identity is a hash of
the source directory's resolved path and the size and mtime of its config and weight files, so a
re-converted or replaced model gets a new export. An export is written into a hidden staging
sibling, the completion marker written last, then renamed into place under a per-export file lock:
a missing marker (crash, kill, full disk) means the directory is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from whisperd import paths
from whisperd.logs import get_logger
from whisperd.models.ct2 import MARKER_NAME, _remove, staged_install
from whisperd.models.fetch import cache_key, model_lock

log = get_logger("whisperd.models")

# Bump when the export command or layout changes, so older exports are rebuilt.
EXPORT_VERSION = 1
EXPORT_TIMEOUT_S = 3600.0
EXPORT_PYTHON_ENV = "WHISPERD_OPENVINO_EXPORT_PYTHON"
# Weight formats for `optimum-cli export openvino --weight-format` (nncf weight compression).
# fp32 is passed explicitly: without --weight-format optimum-intel compresses models > 1B params to int8.
WEIGHT_FORMATS: dict[str, str] = {"int8": "int8", "int4": "int4", "fp16": "fp16", "fp32": "fp32"}
REQUIRED_FILES: tuple[str, ...] = (
    "openvino_encoder_model.xml", "openvino_encoder_model.bin",
    "openvino_decoder_model.xml", "openvino_decoder_model.bin",
    "openvino_tokenizer.xml", "openvino_detokenizer.xml",
    "config.json", "generation_config.json", "preprocessor_config.json",
)
_IDENTITY_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model.bin.index.json",
)


class OpenVINOExportError(RuntimeError):
    """The export could not run or did not produce a usable model; the message says how to fix it."""


def source_identity(model_dir: Path) -> str:
    """Short hash of what makes a transformers model directory itself: path, config, weights."""
    resolved = Path(model_dir).resolve()
    parts = [f"v{EXPORT_VERSION}", str(resolved)]
    for name in _IDENTITY_FILES:
        path = resolved / name
        if path.is_file():
            st = path.stat()
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def export_dir(model_dir: Path, precision: str) -> Path:
    """Where the IR for (model_dir, precision) lives; nothing is created."""
    if precision not in WEIGHT_FORMATS:
        raise ValueError(f"unknown OpenVINO precision {precision!r}: use one of {', '.join(WEIGHT_FORMATS)}")
    resolved = Path(model_dir).resolve()
    return paths.models_dir() / "openvino" / f"{cache_key(resolved.name)}-{source_identity(resolved)}" / precision


def is_export_complete(ir_dir: Path) -> bool:
    """True only for a finished export: the marker (written last) and every file the pipeline reads."""
    ir_dir = Path(ir_dir)
    return (ir_dir / MARKER_NAME).is_file() and all((ir_dir / name).is_file() for name in REQUIRED_FILES)


def export_python() -> str:
    return os.environ.get(EXPORT_PYTHON_ENV) or sys.executable


def export_command(model_dir: Path, out_dir: Path, precision: str, python: str | None = None) -> list[str]:
    """The optimum-cli invocation (as `python -m`, so it needs no console script on PATH)."""
    return [
        python or export_python(), "-m", "optimum.commands.optimum_cli", "export", "openvino",
        "--model", str(model_dir),
        "--task", "automatic-speech-recognition-with-past",
        "--weight-format", WEIGHT_FORMATS[precision],
        str(out_dir),
    ]


def check_exporter(python: str | None = None) -> None:
    """Fail early, with the install command, when the export tools are missing."""
    python = python or export_python()
    probe = "import optimum.intel.openvino, nncf, openvino_tokenizers"
    try:
        result = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OpenVINOExportError(f"cannot run the export interpreter {python}: {exc}") from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise OpenVINOExportError(
            f"exporting a model to OpenVINO needs optimum-intel and nncf in {python} ({tail[0]}): "
            "pip install -r requirements/openvino.txt -r requirements/openvino-export.txt -c requirements/runtime.txt"
            f" (or point {EXPORT_PYTHON_ENV} at a Python that has them)"
        )


def _export_env() -> dict[str, str]:
    env = dict(os.environ)
    # The source is a local directory: never reach for the hub, and keep the child quiet about it.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_export(model_dir: Path, out_dir: Path, precision: str, timeout: float = EXPORT_TIMEOUT_S) -> None:
    """Run optimum-cli into out_dir (which should be a fresh staging dir); raise on any failure."""
    cmd = export_command(model_dir, out_dir, precision)
    log.info("exporting model to OpenVINO IR", model_dir=str(model_dir), precision=precision, command=" ".join(cmd))
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_export_env())
    except subprocess.TimeoutExpired as exc:
        raise OpenVINOExportError(f"OpenVINO export of {model_dir} ({precision}) took over {timeout:.0f} s") from exc
    except OSError as exc:
        raise OpenVINOExportError(f"cannot start the OpenVINO export ({cmd[0]}): {exc}") from exc
    missing = [name for name in REQUIRED_FILES if not (out_dir / name).is_file()]
    if result.returncode != 0 or missing:
        tail = "\n".join((result.stderr or result.stdout or "").strip().splitlines()[-15:])
        reason = f"exit status {result.returncode}" if result.returncode != 0 else f"missing {', '.join(missing)}"
        raise OpenVINOExportError(f"OpenVINO export of {model_dir} ({precision}) failed ({reason}):\n{tail}")


def _versions(python: str) -> dict[str, str]:
    code = ("import json, importlib.metadata as m; print(json.dumps({n: m.version(n) for n in "
            "('optimum-intel', 'optimum', 'nncf', 'openvino', 'openvino-tokenizers', 'transformers', 'torch')}))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout) if out.returncode == 0 else {}
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return {}


def ensure_openvino_model(model_dir: Path, precision: str) -> Path:
    """The IR directory for (model_dir, precision), exporting it first if it is missing or unfinished."""
    model_dir = Path(model_dir).resolve()
    out_dir = export_dir(model_dir, precision)
    if is_export_complete(out_dir):
        return out_dir
    with model_lock(f"openvino--{out_dir.parent.name}--{precision}"):
        if is_export_complete(out_dir):  # another process finished it while we waited
            return out_dir
        if out_dir.exists():
            log.warning("OpenVINO export has no completion marker (interrupted?): rebuilding it", export_dir=str(out_dir))
        # Staging dirs of killed exports: only the lock holder writes one, so any left now is stale.
        for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
            _remove(stale)
        check_exporter()
        started = time.monotonic()
        with staged_install(out_dir) as staged:
            run_export(model_dir, staged, precision)
            (staged / MARKER_NAME).write_text(json.dumps({
                "format": "openvino-whisper",
                "export_version": EXPORT_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "source": str(model_dir),
                "source_identity": source_identity(model_dir),
                "precision": precision,
                "seconds": round(time.monotonic() - started, 1),
                "versions": _versions(export_python()),
            }, indent=2) + "\n", encoding="utf-8")
    log.info("model exported to OpenVINO IR", model_dir=str(model_dir), export_dir=str(out_dir),
             seconds=round(time.monotonic() - started, 1))
    return out_dir


__all__ = [
    "EXPORT_PYTHON_ENV",
    "OpenVINOExportError",
    "REQUIRED_FILES",
    "WEIGHT_FORMATS",
    "check_exporter",
    "ensure_openvino_model",
    "export_command",
    "export_dir",
    "is_export_complete",
    "run_export",
    "source_identity",
]
