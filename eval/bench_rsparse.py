"""`accel bench rsparse-linear`: CPU speed of an R-Sparse linear vs dense F.linear, 1 thread.

Each case times dense and R-Sparse interleaved in one loop (median of `repeats`), so machine
noise hits both alike; the ratio is what is reported. Inputs are Gaussian and the threshold is
set so that the active fraction is (1 − s)·rho, with the rank from the budget split.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

SMOLLM2_SHAPES = {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576), "gate/up 1536x576": (1536, 576),
                  "down 576x1536": (576, 1536)}


def _interleaved(fns, repeats: int) -> list[float]:
    for f in fns:
        f(), f()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for k, f in enumerate(fns):
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return [sorted(t)[len(t) // 2] for t in times]


def _linear_case(out_f, in_f, s, rho, dtype, repeats, seed=0):
    from accel.configs.rsparse import active_fraction, rank_for
    from accel.patches.rsparse import RSparseLinear

    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f ** 0.5)
    lin = lin.to(dtype)
    x = torch.randn(1, in_f, generator=g).to(dtype)
    scale = lin.weight.float().norm(dim=0)
    scale = scale.detach()
    thr = float((x.float().abs() * scale).quantile(1 - active_fraction(s, rho)))
    r = rank_for(in_f, out_f, s, rho)
    down = torch.randn(r, in_f, generator=g).to(dtype) if r else None
    up = torch.randn(out_f, r, generator=g).to(dtype) if r else None
    mod = RSparseLinear(lin, thr, scale, down, up, s, rho)
    mod.weight_t()
    with torch.inference_mode():
        t_dense, t_rs = _interleaved([lambda: F.linear(x, lin.weight), lambda: mod(x)], repeats)
    return {"shape": f"{out_f}x{in_f}", "rank": r, "active": float((x.float().abs() * scale > thr).float().mean()),
            "dense_us": t_dense * 1e6, "rsparse_us": t_rs * 1e6, "speedup": t_dense / t_rs}


def _decode(model, tok, tokens: int) -> float:
    ids = tok("The history of the city begins", return_tensors="pt").input_ids
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return tokens / (time.perf_counter() - t)


def bench_rsparse(sparsity: float = 0.5, rho: float = 0.95, decode_tokens: int = 32, repeats: int = 40,
                  dtype: str = "float32", artifact: str | None = None) -> dict:
    """Needs `torch.set_num_threads(1)` semantics: sets it for the run and restores it."""
    import accel
    from accel.configs.rsparse import RSparseConfig, check_sparsity

    from accel.calibrate.rsparse import calibrate_rsparse

    check_sparsity(sparsity)
    dt = getattr(torch, dtype)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        big = _linear_case(4096, 4096, sparsity, rho, dt, repeats)
        big_sparse = _linear_case(4096, 4096, sparsity, 1.0, dt, repeats)
        other = torch.bfloat16 if dt == torch.float32 else torch.float32
        big_other = _linear_case(4096, 4096, sparsity, rho, other, repeats)
        small = {k: _linear_case(o, i, sparsity, rho, dt, repeats * 5) for k, (o, i) in SMOLLM2_SHAPES.items()}
        model, tok = accel.models.load("smollm2-135m", dtype=dt)
        dense_tps = _decode(model, tok, decode_tokens)
        if artifact is None:
            art = calibrate_rsparse(model, tok, RSparseConfig(sparsity, rho, search="uniform"), n_samples=2,
                                    progress=False)
        else:
            art = artifact
        with accel.patched(model, art):
            rs_tps = _decode(model, tok, decode_tokens)
    finally:
        torch.set_num_threads(old)
    return {"sparsity": sparsity, "rho": rho, "dtype": dtype, "threads": 1,
            "linear_4096": big, "linear_4096_pure_sparse": big_sparse, "smollm2_linears": small,
            f"linear_4096_{str(other).split('.')[-1]}": big_other,
            "decode_tokens": decode_tokens, "decode_tok_s_dense": dense_tps, "decode_tok_s_rsparse": rs_tps,
            "decode_speedup": rs_tps / dense_tps, "speedup_vs_dense": big["speedup"]}


def format_bench(r: dict) -> str:
    lines = [f"R-Sparse linear at {r['sparsity']:.0%} (rho={r['rho']}), batch 1, {r['dtype']}, 1 thread "
             f"(dense F.linear vs R-Sparse, interleaved medians)"]
    cases = [("4096x4096", r["linear_4096"]), ("4096x4096 rho=1", r["linear_4096_pure_sparse"])]
    cases += [(f"4096x4096 {k[12:]}", v) for k, v in r.items() if k in ("linear_4096_bfloat16", "linear_4096_float32")]
    cases += list(r["smollm2_linears"].items())
    for name, c in cases:
        lines.append(f"  {name:18s} r={c['rank']:3d} active={c['active']:.2f}  dense {c['dense_us']:9.1f} us  "
                     f"rsparse {c['rsparse_us']:9.1f} us  speedup {c['speedup']:.2f}x")
    lines.append(f"  SmolLM2 decode ({r['decode_tokens']} tokens): dense {r['decode_tok_s_dense']:.1f} tok/s, "
                 f"R-Sparse {r['decode_tok_s_rsparse']:.1f} tok/s ({r['decode_speedup']:.2f}x)")
    return "\n".join(lines)


def speed_artifact(model, ids: torch.Tensor, sparsity: float = 0.5, rho: float = 0.95):
    """An R-Sparse artifact with the shapes and active fractions of a real one, made in seconds
    (speed only): uniform (s, rho) on every decoder linear, thresholds at the 1 - (1 - s)·rho
    quantile of |x|·‖W[:, i]‖ on `ids` [n, seq] (real text), low-rank factors by a randomized SVD
    (the calibrator's exact fp64 SVDs of every weight take minutes)."""
    from accel.artifact import Artifact
    from accel.configs.rsparse import RSparseConfig, active_fraction, rank_for
    from accel.patches.rsparse import channel_scale
    from accel.patches.targets import iter_linears

    cfg = RSparseConfig(sparsity=sparsity, sparse_share=rho, search="uniform")
    lins = {n: m for n, m in iter_linears(model, cfg.targets, cfg.ignore) if isinstance(m, nn.Linear)}
    q = 1 - active_fraction(sparsity, rho)
    tensors, hooks = {}, []

    def hook(name, scale):
        def f(mod, inp, out):
            score = (inp[0].float().abs() * scale).flatten()
            tensors[f"rsparse/{name}.threshold"] = torch.quantile(score[:1 << 24], q).reshape(())
        return f

    for name, lin in lins.items():
        hooks.append(lin.register_forward_hook(hook(name, channel_scale(lin, "rsparse"))))
    try:
        with torch.inference_mode():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    # svd_lowrank draws from the global generator: seeded here, the caller's state restored.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for name, lin in lins.items():
            tensors[f"rsparse/{name}.s_rho"] = torch.tensor([sparsity, rho])
            r = rank_for(lin.in_features, lin.out_features, sparsity, rho)
            if r:
                u, sv, v = torch.svd_lowrank(lin.weight.detach().float(), q=r, niter=1)
                tensors[f"rsparse/{name}.down"] = (sv[:, None] * v.t()).contiguous()
                tensors[f"rsparse/{name}.up"] = u.contiguous()
    return Artifact.for_model(model, [cfg], tensors)


def held_bytes(model) -> int:
    """Bytes of the distinct tensors a (patched) model holds: parameters, buffers and each R-Sparse
    linear's kernel state (the stacked [Wᵀ; U_rᵀ], the AMX `down`, oneDNN's packed weight), each
    storage counted once. oneDNN's packed tensors have no storage: their numel × element size."""
    from accel.patches.rsparse import RSparseLinear

    seen, total = set(), 0
    for mod in model.modules():
        ts = [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]
        if isinstance(mod, RSparseLinear):
            ts += [t for t in (mod._stack, mod._down_pk, mod._packed) if isinstance(t, torch.Tensor)]
        for t in ts:
            if t.is_mkldnn:
                total += t.numel() * t.element_size()
                continue
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total


def bench_generate(artifact=None, threads=(1, 2), rounds: int = 5, prefill_tokens=(32, 512, 8192), new_tokens: int = 48,
                   sparsity: float = 0.5, model_name: str = "smollm2-135m") -> dict:
    """What a `generate()` user sees in bf16: dense vs R-Sparse, decode tok/s (`new_tokens` after a
    short prompt) and the prefill of prose prompts of each length in `prefill_tokens`, per thread count.

    One process; each round measures every thread count, prompt length and both models in turn
    (interleaved), and medians over rounds are compared. artifact: a saved R-Sparse artifact (path), or
    None for `speed_artifact` at `sparsity` (a path that does not exist yet receives it, for the next run).
    """
    import copy
    import statistics

    import accel
    from accel.data import calibration_samples

    from .matrix_speed import prompt_ids, timed_generate

    lengths = (prefill_tokens,) if isinstance(prefill_tokens, int) else tuple(prefill_tokens)
    model, tok = accel.models.load(model_name, dtype="bfloat16")
    if artifact is None or not Path(artifact).exists():
        art = speed_artifact(model, calibration_samples(tok, n_samples=2, seq_len=128), sparsity)
        if artifact is not None:
            # A path that does not exist yet: keep this calibration there for the next run.
            art.save(artifact)
        artifact = art
    patched = accel.patch(copy.deepcopy(model), artifact)
    models = {"dense": model, "rsparse": patched}
    long_ids = {n: prompt_ids(tok, model, n) for n in lengths}
    short_ids = tok("The history of the city begins", return_tensors="pt").input_ids
    old = torch.get_num_threads()
    times = {(name, t): {"decode": [], **{n: [] for n in lengths}} for name in models for t in threads}
    try:
        for t in threads:
            torch.set_num_threads(t)
            for m in models.values():
                # Warm-up: first-call builds (weight_t, the packed weights, the native kernel) and
                # allocator growth.
                timed_generate(m, long_ids[min(lengths)], 2), timed_generate(m, short_ids, 4)
        for i in range(rounds):
            for t in threads:
                torch.set_num_threads(t)
                for name, m in models.items():
                    for n in lengths:
                        times[(name, t)][n].append(timed_generate(m, long_ids[n], 1)[0])
                    times[(name, t)]["decode"].append(timed_generate(m, short_ids, new_tokens)[1])
                d, rs = times[("dense", t)], times[("rsparse", t)]
                log.info("round %d/%d, %d thread(s): decode %.2fx (dense %.1f tok/s), prefill %s", i + 1, rounds, t,
                         rs["decode"][-1] / d["decode"][-1], d["decode"][-1],
                         ", ".join(f"{n}: {d[n][-1] / rs[n][-1]:.2f}x (dense {d[n][-1] * 1e3:.0f} ms)" for n in lengths))
    finally:
        torch.set_num_threads(old)
    # After the runs, so every first-use build (stack, packed weights) is counted.
    mem = {"dense_bytes": held_bytes(model), "rsparse_bytes": held_bytes(patched)}
    out = {"model": model_name, "dtype": "bfloat16", "rounds": rounds, "prefill_tokens": list(lengths),
           "new_tokens": new_tokens, "threads": list(threads), **mem,
           "memory_ratio": mem["rsparse_bytes"] / mem["dense_bytes"]}
    for (name, t), v in times.items():
        for n in lengths:
            out[f"{name}_prefill_s_{n}_{t}t"] = statistics.median(v[n])
        out[f"{name}_decode_tok_s_{t}t"] = statistics.median(v["decode"])
    for t in threads:
        d, rs = times[("dense", t)], times[("rsparse", t)]
        # The median of per-round ratios: each pair ran back to back, so slow phases of a shared
        # machine cancel within a round.
        out[f"decode_speedup_{t}t"] = statistics.median(a / b for a, b in zip(rs["decode"], d["decode"]))
        for n in lengths:
            out[f"prefill_speedup_{n}_{t}t"] = statistics.median(a / b for a, b in zip(d[n], rs[n]))
    return out


def format_generate(r: dict) -> str:
    lines = [f"{r['model']} bf16 generate(): dense vs R-Sparse, medians of {r['rounds']} interleaved rounds "
             f"(speedups: median of the per-round ratios)",
             f"  memory held: dense {r['dense_bytes'] / 2**20:.0f} MiB, R-Sparse {r['rsparse_bytes'] / 2**20:.0f} MiB "
             f"({r['memory_ratio']:.2f}x)"]
    for t in r["threads"]:
        lines.append(f"  {t} thread(s): decode dense {r[f'dense_decode_tok_s_{t}t']:.1f} tok/s, R-Sparse "
                     f"{r[f'rsparse_decode_tok_s_{t}t']:.1f} ({r[f'decode_speedup_{t}t']:.2f}x)")
        for n in r["prefill_tokens"]:
            lines.append(f"    {n}-token prefill: dense {r[f'dense_prefill_s_{n}_{t}t'] * 1e3:.0f} ms, R-Sparse "
                         f"{r[f'rsparse_prefill_s_{n}_{t}t'] * 1e3:.0f} ms ({r[f'prefill_speedup_{n}_{t}t']:.2f}x)")
    return "\n".join(lines)


def main(argv=None) -> int:
    """python -m accel.eval.bench_rsparse [--artifact DIR] [--model M] [--rounds N] [--threads 1,2]
    [--prefill-tokens 32,512,8192] [--json]"""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m accel.eval.bench_rsparse",
                                description="bf16 generate(): dense vs R-Sparse decode tok/s and prefill ratios")
    p.add_argument("--artifact", default=None, help="saved R-Sparse artifact; a new path: calibrate 50%% now and save it there")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--prefill-tokens", default="32,512,8192", help="prompt lengths (comma-separated)")
    p.add_argument("--model", default="smollm2-135m", help="accel.models.load name (e.g. qwen2.5-0.5b)")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    r = bench_generate(a.artifact, tuple(int(t) for t in a.threads.split(",")), a.rounds,
                       tuple(int(n) for n in a.prefill_tokens.split(",")), a.new_tokens, model_name=a.model)
    print(format_generate(r))
    if a.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
