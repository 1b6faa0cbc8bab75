"""Whisper models as local transformers directories: fetched, cached, or converted from CTranslate2.

Importing this package is cheap: transformers and torch are imported only when a conversion runs.
"""

from whisperd.models.ct2 import CT2FormatError, CT2Model, import_ct2_model, is_complete, read_ct2_model
from whisperd.models.fetch import (
    ModelNotFoundError,
    canonical_name,
    fetch_model,
    is_ct2_dir,
    is_transformers_whisper_dir,
    resolve_model,
)

__all__ = [
    "CT2FormatError",
    "CT2Model",
    "ModelNotFoundError",
    "canonical_name",
    "fetch_model",
    "import_ct2_model",
    "is_complete",
    "is_ct2_dir",
    "is_transformers_whisper_dir",
    "read_ct2_model",
    "resolve_model",
]
