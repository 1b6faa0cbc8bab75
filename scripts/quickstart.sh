#!/usr/bin/env bash
# Set everything up and run the daemon on config.example.yaml with ./inbox, using whisper-base
# (a real model this machine can obtain). Drop a recording into ./inbox; text appears next to it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
mkdir -p inbox
exec .venv/bin/whisperd run --config config.example.yaml --model "${WHISPERD_MODEL:-openai/whisper-base}" \
    --precision "${WHISPERD_PRECISION:-auto}" "$@"
