"""Evaluation helpers: real speech clips with references, and WER/CER scoring.

Importing this package needs only the standard library; the scoring dependencies
(jiwer, whisper-normalizer, zhconv from the ``test`` extra) are imported when a
scoring function is first called.
"""

from whisperd_support.evaluation.clips import (
    ClipFetchError,
    ClipSource,
    DevClip,
    fetch_clip,
    fetch_clips,
    load_manifest,
)
from whisperd_support.evaluation.scoring import ErrorRate, error_rate, normalize_text, score

__all__ = [
    "ClipFetchError",
    "ClipSource",
    "DevClip",
    "ErrorRate",
    "error_rate",
    "fetch_clip",
    "fetch_clips",
    "load_manifest",
    "normalize_text",
    "score",
]
