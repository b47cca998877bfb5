#!/usr/bin/env bash
# README's main job: set up, then run the end-to-end demo on the embedded SmolLM2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
exec .venv/bin/accel demo "$@"
