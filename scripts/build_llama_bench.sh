#!/usr/bin/env bash
# Build llama.cpp's `llama-bench` from source, taken from PyPI, for `accel bench decode --llama-bench PATH`.
#
# Usage:  bash scripts/build_llama_bench.sh DEST_DIR [GGUF]
#   -> DEST_DIR/bin/llama-bench (its path is the last line printed); logs in DEST_DIR/logs/.
#   With GGUF (e.g. `.venv/bin/python -c "import accel; print(accel.models.smollm2_gguf_path())"`), the binary
#   is smoke-run on it (-p 8 -n 4, 1 thread) and the script fails if it crashes.
#   Then:  accel bench decode --compile --threads 1,2 --json --llama-bench DEST_DIR/bin/llama-bench
#
# Why PyPI: machines here reach package registries only. The llama-cpp-python sdist vendors llama.cpp
# (vendor/llama.cpp, tools/llama-bench included), so `pip download --no-binary` gives a pinned source tree.
# Only the llama-bench target is built (ggml, llama, llama-common, llama-bench: 134 ninja steps, 22 min at -j2
# on this 2-core machine under load ~12; the sdist is 77 MB, the build dir ~300 MB).
#
# Environment (all optional):
#   LLAMA_CPP_PYTHON_VERSION  sdist version (default 0.3.36: llama.cpp of 2026-10-01)
#   JOBS                      parallel compile jobs (default 2)
#   NICE                      nice level of the build (default 19: the machine is shared)
#   GGML_NATIVE               ON (default): -march=native, so AVX-512 / AVX-512 VNNI / BF16 where the CPU has them.
#   AMX                       OFF (default): adds -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 after -march=native, so
#                             ggml's AMX path (amx/mmq.cpp, used for Q4_0/Q4_1/Q8_0/K-quant weights) is not built.
#                             Why: on this machine (llama.cpp 0c1e570, GCC 12, Sapphire-Rapids-class VM) an AMX build
#                             dies at the first matmul (SIGSEGV, general protection fault on `ldtilecfg` in
#                             ggml_backend_amx_mul_mat). AMX=ON builds it anyway; run such a binary with
#                             `--repack 0` (no extra buffer types) to get the non-AMX kernels from it: for the
#                             embedded SmolLM2 GGUF (Q4_1, Q8_0 embeddings) x86 has no CPU_REPACK layout, so those
#                             are the kernels an AMX=OFF build runs.
# Measuring on a loaded machine: llama-bench (OpenMP) spin-waits; with more runnable threads than cores, 2-thread
# decode fell to 0.13 tok/s (load ~20) and came back to ~60 tok/s with OMP_WAIT_POLICY=passive. On a quiet
# machine leave the default.
#   EXTRA_CMAKE_ARGS          appended to the configure line (word-split)
#   PYTHON                    python with pip (default: python3)
# cmake (>= 3.14) and ninja come from the system when present, otherwise from PyPI into DEST_DIR/venv.
# DEST_DIR must be outside the accel repository (the build is ~300 MB); set ALLOW_IN_REPO=1 to override.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 || "$1" == -* ]]; then
    sed -n '2,8p' "$0" >&2
    exit 2
fi
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
NICE="${NICE:-19}"
NATIVE="${GGML_NATIVE:-ON}"
AMX="${AMX:-OFF}"
NO_AMX_FLAGS=""
[[ "$AMX" == ON ]] || NO_AMX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
PY="${PYTHON:-python3}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
# Resolved before anything is created, so a refused DEST_DIR leaves nothing behind.
DEST="$(realpath -m "$1")"
case "$DEST/" in
    "$REPO"/*)
        if [[ "${ALLOW_IN_REPO:-0}" != 1 ]]; then
            echo "build_llama_bench.sh: DEST_DIR $DEST is inside the repository $REPO; pick a directory outside it" >&2
            exit 2
        fi ;;
esac
LOGS="$DEST/logs"
mkdir -p "$LOGS" "$DEST/dl" "$DEST/bin"
log() { echo "[build_llama_bench $(date -u +%H:%M:%S)] $*" | tee -a "$LOGS/steps.log" >&2; }

# cmake/ninja: the system's when usable, else PyPI wheels in a venv of our own (never the project's venv).
CMAKE="$(command -v cmake || true)"
NINJA="$(command -v ninja || true)"
if [[ -n "$CMAKE" ]]; then
    have="$("$CMAKE" --version | head -1 | awk '{print $3}')"
    [[ "$(printf '%s\n' 3.14 "$have" | sort -V | head -1)" == 3.14 ]] || CMAKE=""
fi
if [[ -z "$CMAKE" || -z "$NINJA" ]]; then
    log "cmake/ninja from PyPI into $DEST/venv"
    "$PY" -m venv "$DEST/venv"
    "$DEST/venv/bin/python" -m pip install -q cmake ninja >>"$LOGS/pip.log" 2>&1
    CMAKE="$DEST/venv/bin/cmake"
    NINJA="$DEST/venv/bin/ninja"
fi
log "cmake: $("$CMAKE" --version | head -1) ($CMAKE); ninja: $("$NINJA" --version) ($NINJA)"

SDIST="$DEST/dl/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    log "pip download llama-cpp-python==$VERSION (sdist)"
    # --no-binary for this package only: its build deps (scikit-build-core) may come as wheels.
    "$PY" -m pip download --no-deps --no-binary llama-cpp-python -d "$DEST/dl" \
        "llama-cpp-python==$VERSION" >>"$LOGS/pip.log" 2>&1
fi
log "sdist $(sha256sum "$SDIST")"
SRC_ROOT="$DEST/llama_cpp_python-$VERSION"
if [[ ! -d "$SRC_ROOT/vendor/llama.cpp/tools/llama-bench" ]]; then
    tar xzf "$SDIST" -C "$DEST"
fi
SRC="$SRC_ROOT/vendor/llama.cpp"
BUILD="$DEST/build"

log "configure $SRC -> $BUILD (GGML_NATIVE=$NATIVE, AMX=$AMX, Release, static)"
# No server/UI/tests/examples (the UI step downloads assets), no OpenSSL (llama-bench needs no HTTPS).
# shellcheck disable=SC2086
"$CMAKE" -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_MAKE_PROGRAM="$NINJA" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE="$NATIVE" \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF \
    -DCMAKE_C_FLAGS="$NO_AMX_FLAGS" -DCMAKE_CXX_FLAGS="$NO_AMX_FLAGS" ${EXTRA_CMAKE_ARGS:-} \
    >"$LOGS/configure.log" 2>&1 || { tail -30 "$LOGS/configure.log" >&2; exit 1; }

log "build llama-bench (-j$JOBS, nice $NICE)"
start=$(date +%s)
nice -n "$NICE" "$CMAKE" --build "$BUILD" --target llama-bench -j "$JOBS" -- -v \
    >"$LOGS/build.log" 2>&1 || { tail -30 "$LOGS/build.log" >&2; exit 1; }
log "built in $(( $(date +%s) - start )) s"
install -m 755 "$BUILD/bin/llama-bench" "$DEST/bin/llama-bench"
# Which ISA paths went in: -march=native defines __AMX_INT8__ etc. on AMX CPUs.
grep -o -- '-march=[a-z0-9-]*' "$LOGS/build.log" | sort -u | tee -a "$LOGS/steps.log" >&2 || true
if [[ $# -eq 2 ]]; then
    log "smoke run on $2"
    "$DEST/bin/llama-bench" -m "$2" -t 1 -p 8 -n 4 -r 1 >"$LOGS/smoke.log" 2>&1 \
        || { echo "build_llama_bench.sh: $DEST/bin/llama-bench failed on $2 (exit $?), see $LOGS/smoke.log" >&2; exit 1; }
    tail -4 "$LOGS/smoke.log" >&2
fi
echo "$DEST/bin/llama-bench"
