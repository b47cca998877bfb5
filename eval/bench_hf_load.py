"""Size and load memory of an accel HF checkpoint: GQSA W4S50 g16 on SmolLM2 against the bf16 one.

    python -m accel.eval.bench_hf_load [--workdir DIR]

Writes the dense bf16 checkpoint and the GQSA one (an RTN artifact of the W4S50 g16 layout: sizes
and memory do not depend on the calibration), then loads the GQSA checkpoint with
`from_pretrained(dtype=bfloat16)` in a fresh process and reports the peak RSS growth while
loading (Linux: VmHWM after resetting it through /proc/self/clear_refs; else ru_maxrss minus
the RSS before, an upper bound). Prints one JSON object of the sizes and ratios.
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


def make_checkpoints(workdir: Path) -> tuple[Path, Path]:
    """(bf16 checkpoint, GQSA W4S50 g16 accel checkpoint) of SmolLM2 under `workdir`."""
    import torch

    import accel
    from accel.calibrate.gqsa import rtn_artifact
    from accel.configs.gqsa import GQSAConfig

    dense, ck = workdir / "bf16", workdir / "gqsa_w4s50_g16"
    model, tok = accel.models.load("smollm2-135m", dtype=torch.bfloat16)
    if not dense.exists():
        model.save_pretrained(dense)
    if not ck.exists():
        art = rtn_artifact(model, GQSAConfig(bits=4, sparsity=0.5, group_size=16, allocation="uniform"))
        accel.patch(model, art)
        accel.save_pretrained(model, ck, tokenizer=tok)
    return dense, ck


def measure_load(ck: Path) -> dict:
    """Peak RSS growth of `from_pretrained(ck)` in a fresh process (see module doc)."""
    r = subprocess.run([sys.executable, "-c", _CHILD, str(ck)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(workdir: Path) -> dict:
    import safetensors

    dense, ck = make_checkpoints(workdir)
    mem = measure_load(ck)
    with safetensors.safe_open(str(ck / "model.safetensors"), "pt") as f:
        gqsa_keys = [k for k in f.keys() if k.rpartition(".")[2] in ("qweight", "colmask", "scales", "zeros", "meta")]
        gqsa_bytes = sum(_nbytes(f.get_slice(k)) for k in gqsa_keys)
    with safetensors.safe_open(str(dense / "model.safetensors"), "pt") as f:
        lin = [k for k in f.keys() if k.endswith("_proj.weight")]
        lin_bytes = sum(_nbytes(f.get_slice(k)) for k in lin)
    total = _bytes(ck)
    return {"bf16_bytes": _bytes(dense), "accel_bytes": total, "size_ratio": round(total / _bytes(dense), 4),
            "gqsa_linears_bytes": gqsa_bytes, "bf16_linears_bytes": lin_bytes,
            "linears_ratio": round(gqsa_bytes / lin_bytes, 4), "load_peak_rss_growth": mem["growth"],
            "rss_growth_over_checkpoint": round(mem["growth"] / total, 3), "model_bytes_held": mem["model_bytes"],
            "peak_reset": mem["peak_reset"], "patched": mem["patched"]}


_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "F16": 2, "BF16": 2, "I32": 4, "F32": 4, "I64": 8, "F64": 8}


def _nbytes(sl) -> int:
    n = 1
    for d in sl.get_shape():
        n *= d
    return n * _SIZES[sl.get_dtype()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temp dir)")
    args = p.parse_args(argv)
    if args.workdir:
        print(json.dumps(run(Path(args.workdir)), indent=2))
    else:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(run(Path(d)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
