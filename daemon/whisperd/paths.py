"""Where whisperd keeps downloaded and converted things (models, evaluation audio)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of whisperd's cache: $WHISPERD_CACHE_DIR, else $XDG_CACHE_HOME/whisperd, else ~/.cache/whisperd."""
    explicit = os.environ.get("WHISPERD_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "whisperd"


def models_dir() -> Path:
    return cache_dir() / "models"


def downloads_dir() -> Path:
    """Package archives fetched from PyPI (model and evaluation packages), kept to avoid re-downloading."""
    return cache_dir() / "downloads"
