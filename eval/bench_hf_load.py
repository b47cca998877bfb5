"""Size and load memory of an accel HF checkpoint: GQSA W4S50 g16 on SmolLM2 against the bf16 one.

    python -m accel.eval.bench_hf_load [--workdir DIR] [--embedding-bits {4,8,none}] [--embedding-group-size G]

Writes the dense bf16 checkpoint and the GQSA one (an RTN artifact of the W4S50 g16 layout, with
the input embedding / tied lm_head packed at --embedding-bits, default 4, g32: sizes and memory
do not depend on the calibration), then loads the GQSA checkpoint with
`from_pretrained(dtype=bfloat16)` in a fresh process (after loading a tiny accel checkpoint
there: the imports and kernel build any first load pays, ~22 MB, are not this checkpoint's) and
reports the peak RSS growth while loading (Linux: VmHWM after resetting it through /proc/self/clear_refs; else ru_maxrss minus
the RSS before, an upper bound). Prints one JSON object of the sizes and ratios: size_ratio
(whole checkpoint / bf16 checkpoint) and linears_ratio (the GQSA linears / their bf16 bytes).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, resource, sys
import torch
import accel
from transformers import AutoModelForCausalLM

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
if len(sys.argv) > 2:
    # Warm-up: a tiny accel checkpoint first, so the lazy imports and the kernel extension that
    # any first load pays (~22 MB here) are not counted against this checkpoint.
    AutoModelForCausalLM.from_pretrained(sys.argv[2])
try:
    open("/proc/self/clear_refs", "w").write("5")   # reset the peak to the current RSS
    reset = True
except OSError:
    reset = False
before = rss()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
peak = hwm() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
print(json.dumps({"rss_before": before, "peak": peak, "growth": peak - before, "model_bytes": held,
                  "peak_reset": reset, "patched": accel.is_patched(model)}))
"""


def _bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def dense_bf16_bytes(model) -> int:
    """Bytes of `model`'s tensors in bf16 as save_pretrained stores them (tied tensors once; the
    safetensors header, a few KB, not counted)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * (2 if t.is_floating_point() else t.element_size())
    return total


def make_checkpoints(workdir: Path, model=None, tok=None, art=None, embedding_bits: int | None = 4,
                     embedding_group_size: int = 32, write_dense: bool = True) -> tuple[Path | int, Path]:
    """(bf16 checkpoint, or its bytes when write_dense=False; GQSA W4S50 g16 accel checkpoint) of
    SmolLM2 under `workdir`. model (bf16; default loaded here), tok: given by callers that have
    them; art: the GQSA artifact to patch with (default an RTN one of that layout)."""
    import torch

    import accel
    from accel.calibrate.gqsa import rtn_artifact
    from accel.configs.gqsa import GQSAConfig

    dense, ck = workdir / "bf16", workdir / "gqsa_w4s50_g16"
    if model is None:
        model, tok = accel.models.load("smollm2-135m", dtype=torch.bfloat16)
    if not write_dense:
        dense = dense_bf16_bytes(model)
    elif not dense.exists():
        model.save_pretrained(dense)
    if not ck.exists():
        if art is None:
            art = rtn_artifact(model, GQSAConfig(bits=4, sparsity=0.5, group_size=16, allocation="uniform",
                                                 embedding_bits=embedding_bits,
                                                 embedding_group_size=embedding_group_size))
        with accel.patched(model, art):
            accel.save_pretrained(model, ck, tokenizer=tok)
    return dense, ck


def warmup_checkpoint(workdir: Path) -> Path:
    """A tiny tied llama with the same GQSA layout (embedding packed), for measure_load's warm-up."""
    import accel
    from accel.calibrate.gqsa import rtn_artifact
    from accel.configs.gqsa import GQSAConfig

    ck = workdir / "warmup_tiny"
    if not ck.exists():
        m = accel.models.tiny("llama", tie_word_embeddings=True)
        accel.patch(m, rtn_artifact(m, GQSAConfig(bits=4, sparsity=0.5, group_size=16, allocation="uniform",
                                                  embedding_bits=4)))
        accel.save_pretrained(m, ck)
    return ck


def measure_load(ck: Path, warmup: Path | None = None) -> dict:
    """Peak RSS growth of `from_pretrained(ck)` in a fresh process (see module doc), after loading
    `warmup` (a tiny accel checkpoint) in it when given."""
    r = subprocess.run([sys.executable, "-c", _CHILD, str(ck)] + ([str(warmup)] if warmup else []),
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


_LINEAR_LEAVES = ("qweight", "colmask", "scales", "zeros", "meta")


def run(workdir: Path, **kw) -> dict:
    """Sizes and load memory (see module doc); kw: make_checkpoints' options."""
    import safetensors

    dense, ck = make_checkpoints(workdir, **kw)
    mem = measure_load(ck, warmup_checkpoint(workdir))
    with safetensors.safe_open(str(ck / "model.safetensors"), "pt") as f:
        # The decoder linears only (the packed embedding / lm_head are counted in the total).
        gqsa_keys = [k for k in f.keys() if k.rpartition(".")[2] in _LINEAR_LEAVES and "_proj." in k]
        gqsa_bytes = sum(_nbytes(f.get_slice(k)) for k in gqsa_keys)
        emb_bytes = sum(_nbytes(f.get_slice(k)) for k in f.keys() if "embed_tokens." in k or k.startswith("lm_head."))
    lin_bytes = 0
    if isinstance(dense, Path):
        with safetensors.safe_open(str(dense / "model.safetensors"), "pt") as f:
            lin_bytes = sum(_nbytes(f.get_slice(k)) for k in f.keys() if k.endswith("_proj.weight"))
        dense = _bytes(dense)
    else:
        lin_bytes = _dense_linears(kw.get("model"))
    total = _bytes(ck)
    return {"bf16_bytes": dense, "accel_bytes": total, "size_ratio": round(total / dense, 4),
            "gqsa_linears_bytes": gqsa_bytes, "bf16_linears_bytes": lin_bytes,
            "linears_ratio": round(gqsa_bytes / lin_bytes, 4), "embedding_bytes": emb_bytes,
            "load_peak_rss_growth": mem["growth"],
            "rss_growth_over_checkpoint": round(mem["growth"] / total, 3), "model_bytes_held": mem["model_bytes"],
            "peak_reset": mem["peak_reset"], "patched": mem["patched"]}


def _dense_linears(model) -> int:
    return sum(t.numel() * 2 for k, t in model.state_dict().items() if k.endswith("_proj.weight"))


_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "F16": 2, "BF16": 2, "I32": 4, "F32": 4, "I64": 8, "F64": 8}


def _nbytes(sl) -> int:
    n = 1
    for d in sl.get_shape():
        n *= d
    return n * _SIZES[sl.get_dtype()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temp dir)")
    p.add_argument("--embedding-bits", default="4", choices=["4", "8", "none"],
                   help="GQSA embedding_bits of the checkpoint (none: embedding and lm_head stay bf16)")
    p.add_argument("--embedding-group-size", type=int, default=32)
    args = p.parse_args(argv)
    kw = {"embedding_bits": None if args.embedding_bits == "none" else int(args.embedding_bits),
          "embedding_group_size": args.embedding_group_size}
    if args.workdir:
        print(json.dumps(run(Path(args.workdir), **kw), indent=2))
    else:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(run(Path(d), **kw), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
