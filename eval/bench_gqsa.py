"""`accel bench gqsa-gemv`: CPU speed of the GQSA W4S50 path against dense bf16 and dense int4.

All ratios come from one run, 1 thread, methods interleaved round by round (median of rounds), so
load from other processes on a shared VM hits every method alike.
"""
from __future__ import annotations

import logging
import statistics
import time

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SHAPES = [(4096, 4096), (576, 1536), (1536, 576)]  # (in, out)


def _time(fn, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def _interleaved(fns: dict, rounds: int, reps: int) -> dict[str, float]:
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            times[k].append(_time(f, reps))
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def bench_gemv(shapes=SHAPES, batches=(1, 8), group_size: int = 16, tile_rows: int = 1,
               sparsity: float = 0.5, rounds: int = 7, seed: int = 42) -> list[dict]:
    """ms per call of dense bf16 F.linear, dense int4 (aten; g = 32, the finest group it takes, or
    the GQSA group size when that is a multiple of 32) and GQSA W4S50."""
    from accel.kernels.gqsa_linear.cpu import CPUGQSA
    from accel.kernels.gqsa_linear.format import pack_weight

    g = torch.Generator().manual_seed(seed)
    rows = []
    for k, n in shapes:
        W = torch.randn(n, k, generator=g) * 0.02
        wb = W.bfloat16()
        g4 = group_size if group_size % 32 == 0 else 32
        dense4 = CPUGQSA(pack_weight(W, sparsity=0.0, group_size=g4, tile_rows=n), native=False)
        packed = pack_weight(W, sparsity=sparsity, group_size=group_size, tile_rows=tile_rows)
        gq = CPUGQSA(packed)
        for b in batches:
            x = torch.randn(b, k, generator=g).bfloat16()
            reps = max(3, int(2e8 / (n * k * 2)))
            t = _interleaved({"bf16": lambda: F.linear(x, wb), "int4": lambda: dense4(x), "gqsa": lambda: gq(x)},
                             rounds, reps)
            rows.append({"in": k, "out": n, "batch": b, "int4_group": g4, "ms_bf16": t["bf16"], "ms_int4": t["int4"],
                         "ms_gqsa": t["gqsa"], "speedup_vs_bf16": t["bf16"] / t["gqsa"],
                         "speedup_vs_int4": t["int4"] / t["gqsa"], "path": gq.path,
                         "bytes_ratio": packed.nbytes() / (n * k * 2),
                         "runtime_bytes_ratio": gq.nbytes() / (n * k * 2)})
            log.info("gemv %dx%d B=%d: %s", k, n, b, rows[-1])
        if n >= 1024:
            # Layouts at batch 1 against dense int4: the per-row layouts need the native kernel; the
            # tile layout also runs on torch's int4 kernel, compacted per tile (cpu-int4-compact).
            x = torch.randn(1, k, generator=g).bfloat16()
            variants = {"g16 per-row": CPUGQSA(pack_weight(W, sparsity=sparsity, group_size=16)),
                        "g32 per-row": CPUGQSA(pack_weight(W, sparsity=sparsity, group_size=32)),
                        "g32 tile192": CPUGQSA(pack_weight(W, sparsity=sparsity, group_size=32, tile_rows=192)),
                        "g32 tile192 torch-int4": CPUGQSA(pack_weight(W, sparsity=sparsity, group_size=32,
                                                                      tile_rows=192), native=False)}
            t = _interleaved({"int4": lambda: dense4(x), **{kk: (lambda v=v: v(x)) for kk, v in variants.items()}},
                             rounds, max(3, int(2e8 / (n * k * 2))))
            rows[-len(batches)]["layouts_vs_int4_b1"] = {f"{kk} ({v.path})": t["int4"] / t[kk]
                                                          for kk, v in variants.items()}
    return rows


def bench_decode(model_name: str = "smollm2-135m", new_tokens: int = 32, group_size: int = 16,
                 tile_rows: int = 1, sparsity: float = 0.5, rounds: int = 3) -> dict:
    """Greedy decode tokens/s of the bf16 model, dense vs GQSA W4S50 (RTN weights: speed only)."""
    import accel
    from accel.calibrate.gqsa import rtn_artifact
    from accel.configs.gqsa import GQSAConfig

    model, tok = accel.models.load(model_name, dtype="bfloat16")
    art = rtn_artifact(model, GQSAConfig(bits=4, sparsity=sparsity, group_size=group_size, tile_rows=tile_rows))
    ids = tok("The history of the city begins", return_tensors="pt").input_ids

    def gen():
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    res = {"dense": [], "gqsa": []}
    gen()
    for _ in range(rounds):
        res["dense"].append(_time(gen, 1))
        with accel.patched(model, art):
            gen()
            res["gqsa"].append(_time(gen, 1))
            paths = sorted({r["kernel"] for r in accel.report(model).rows})
    tps = {k: new_tokens / statistics.median(v) for k, v in res.items()}
    return {"dense_bf16_tok_s": tps["dense"], "gqsa_tok_s": tps["gqsa"], "speedup": tps["gqsa"] / tps["dense"],
            "new_tokens": new_tokens, "gqsa_paths": paths, "note": "lm_head and embeddings stay dense bf16"}


# SmolLM2-135M's linears of one decoder layer, (in, out, count): q, k, v, o, gate, up, down.
SMOLLM2_LAYER = [(576, 576, 2), (576, 192, 2), (576, 1536, 2), (1536, 576, 1)]


def bench_ops(threads=(1, 2), group_size: int = 16, sparsity: float = 0.5, rounds: int = 9, reps: int = 200,
              layers: int = 30, seed: int = 42) -> dict:
    """us per call at one activation row, SmolLM2 shapes, of: the C++ op `accel::gqsa_mm_cpu` (what
    a compiled graph calls), the Python custom op `accel::gqsa_linear` (what it called before), the
    direct call (eager) and dense bf16 F.linear; interleaved round by round (medians). Also the
    per-token sums over `layers` decoder layers (ms)."""
    from accel.kernels.gqsa_linear import cpp_ext
    from accel.kernels.gqsa_linear.format import pack_weight

    if not cpp_ext.available():
        raise RuntimeError("bench_ops needs the native GQSA kernel (a C++ compiler and AVX512-BF16/VBMI)")
    g = torch.Generator().manual_seed(seed)
    old = torch.get_num_threads()
    out = {"rows": [], "per_token_ms": {}}
    try:
        for t in threads:
            torch.set_num_threads(t)
            tot = {"cpp_op": 0.0, "py_op": 0.0, "direct": 0.0, "dense_bf16": 0.0}
            for k, n, cnt in SMOLLM2_LAYER:
                W = torch.randn(n, k, generator=g) * 0.02
                w, wb = pack_weight(W, sparsity=sparsity, group_size=group_size), W.bfloat16()
                x = torch.randn(1, k, generator=g).bfloat16()
                a = (w.qweight, w.colmask, w.scales, w.zeros)
                fns = {"cpp_op": lambda: torch.ops.accel.gqsa_mm_cpu(x, *a, group_size),
                       "py_op": lambda: torch.ops.accel.gqsa_linear(x, w.qweight, w.colmask, None, w.scales, w.zeros,
                                                                    None, k, group_size, 4, 1, "cpu-avx512", 0, 0, ""),
                       "direct": lambda: cpp_ext.linear(x, *a, group_size),
                       "dense_bf16": lambda: F.linear(x, wb)}
                us = {kk: v * 1e3 for kk, v in _interleaved(fns, rounds, reps).items()}
                out["rows"].append({"threads": t, "in": k, "out": n, **{f"us_{kk}": v for kk, v in us.items()}})
                for kk in tot:
                    tot[kk] += us[kk] * cnt * layers / 1e3
            out["per_token_ms"][f"{t}t"] = tot
    finally:
        torch.set_num_threads(old)
    return out


if __name__ == "__main__":
    # python -m eval.bench_gqsa: per-call costs of the GQSA ops at decode (bench_ops).
    import json

    res = bench_ops()
    for r in res["rows"]:
        print(f"{r['threads']}t {r['in']:>5}->{r['out']:<5} " + "  ".join(
            f"{k[3:]} {v:6.1f} us" for k, v in r.items() if k.startswith("us_")))
    for t, tot in res["per_token_ms"].items():
        print(f"{t} per token (30 layers, 7 linears each): " + "  ".join(f"{k} {v:.2f} ms" for k, v in tot.items()))
    print(json.dumps(res))
