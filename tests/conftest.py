"""Shared fixtures: real Whisper models and real recorded speech, fetched once into ~/.cache/whisperd;
a throwaway PostgreSQL server (pg_harness)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

# Test support lives in support/ (not in the installed package); pytest puts it on sys.path, and
# this puts it on the path of every Python the tests start (daemons, helper processes).
_SUPPORT = Path(__file__).resolve().parents[1] / "support"
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(_SUPPORT), os.environ.get("PYTHONPATH")) if p)

from pg_harness import own_postgres_server, pg_url, postgres_server  # noqa: E402, F401 - fixtures, after PYTHONPATH
from whisperd.engine import Engine, create_engine  # noqa: E402
from whisperd.options import EngineSettings  # noqa: E402
from whisperd_support.evaluation import DevClip, fetch_clip  # noqa: E402

BASE_MODEL = "openai/whisper-base"


@pytest.fixture(scope="session")
def clip() -> Callable[[str], DevClip]:
    """fetch_clip, as a fixture so tests read as `clip("en_goforward")`."""
    return fetch_clip


_ENGINES: dict[tuple[str, str, str], Engine] = {}


def load_engine(precision: str, model: str = BASE_MODEL, backend: str = "transformers") -> Engine:
    """One engine per (model, precision, backend) for the whole session: loading is the slow part."""
    key = (model, precision, backend)
    if key not in _ENGINES:
        if backend == "openvino":
            pytest.importorskip("openvino_genai", reason="backend openvino needs requirements/openvino.txt")
        _ENGINES[key] = create_engine(EngineSettings(model=model, device="cpu", precision=precision,
                                                     backend=backend))
    return _ENGINES[key]


@pytest.fixture(scope="session")
def engine_fp32() -> Engine:
    return load_engine("fp32")


@pytest.fixture(scope="session")
def engine_int4() -> Engine:
    return load_engine("sym_int4")


@pytest.fixture(scope="session")
def ov_int8() -> Engine:
    return load_engine("int8", backend="openvino")


# Every engine whisperd runs well on the CPU: transformers fp32 and IPEX-LLM sym_int4, OpenVINO int8.
ENGINES = [("transformers", "fp32"), ("transformers", "sym_int4"), ("openvino", "int8")]


@pytest.fixture(scope="session", params=ENGINES, ids=[f"{b}-{p}" for b, p in ENGINES])
def engine(request: pytest.FixtureRequest) -> Engine:
    """Each test using this runs once per engine."""
    backend, precision = request.param
    return load_engine(precision, backend=backend)


@pytest.fixture(scope="session", params=["transformers", "openvino"])
def each_backend(request: pytest.FixtureRequest) -> Engine:
    """Each test using this runs once per backend, at its full-accuracy CPU precision."""
    return load_engine("fp32", backend="transformers") if request.param == "transformers" else \
        load_engine("int8", backend="openvino")
