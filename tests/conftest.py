"""Shared fixtures: real Whisper models and real recorded speech, fetched once into ~/.cache/whisperd."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from whisperd.engine import Engine, create_engine
from whisperd.evaluation import DevClip, fetch_clip
from whisperd.options import EngineSettings

BASE_MODEL = "openai/whisper-base"


@pytest.fixture(scope="session")
def clip() -> Callable[[str], DevClip]:
    """fetch_clip, as a fixture so tests read as `clip("en_goforward")`."""
    return fetch_clip


_ENGINES: dict[tuple[str, str], Engine] = {}


def load_engine(precision: str, model: str = BASE_MODEL) -> Engine:
    """One engine per (model, precision) for the whole session: loading is the slow part."""
    key = (model, precision)
    if key not in _ENGINES:
        _ENGINES[key] = create_engine(EngineSettings(model=model, device="cpu", precision=precision))
    return _ENGINES[key]


@pytest.fixture(scope="session")
def engine_fp32() -> Engine:
    return load_engine("fp32")


@pytest.fixture(scope="session")
def engine_int4() -> Engine:
    return load_engine("sym_int4")


@pytest.fixture(scope="session", params=["fp32", "sym_int4"])
def engine(request: pytest.FixtureRequest) -> Engine:
    """Each test using this runs once per precision the CPU path supports well."""
    return load_engine(request.param)
