#!/usr/bin/env bash
# Set up (venv, model, evaluation clips), lint (ruff), type-check (mypy) and run the test suite. Extra arguments go to pytest,
# e.g. `scripts/test.sh -m "not slow"` for the fast set.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check daemon support tests benchmarks
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
