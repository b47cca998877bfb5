"""`accel bench ds-attention`: CPU decode-attention speed of Double Sparsity against the best dense
path, and end-to-end SmolLM2 decode tokens/s, DS against dense.

Timing protocol (shared 2-vCPU VM): 1 thread (`torch.set_num_threads(1)`), all variants of one
shape interleaved round by round in one process (the order rotates every round, so no variant
always runs right after a long one). The speedup is min(best dense) / min(DS) over the rounds: on
a VM whose other tenants come and go, the minimum is the stable estimate of each op's uncontended
time; the ratio of medians and the median of per-round (back-to-back) ratios are reported beside
it. The load average is recorded as well.
"""
from __future__ import annotations

import logging
import os
import statistics
import time

import torch

from accel.patches import compat

log = logging.getLogger(__name__)

ATTN_SHAPES = {"llama-8b": (32, 8, 128), "smollm2": (9, 3, 64)}


def _timed_rounds(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Run every fn once per round, interleaved; returns seconds per call for each name."""
    for f in fns.values():
        f()
    times = {n: [] for n in fns}
    names = list(fns)
    for i in range(rounds):
        for n in names[i % len(names):] + names[:i % len(names)]:
            f = fns[n]
            t0 = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t0)
    return times


def bench_attention(T: int, H: int, KVH: int, D: int, dtype: str = "float32", fraction: float = 1 / 16,
                    r: int | None = None, rounds: int = 9, seed: int = 0) -> dict:
    """Decode attention at batch 1, one query token, T cached tokens: SDPA (enable_gqa), grouped
    matmul dense, and DS (`ds_decode_attention(path="cpu")`, budget = fraction*T, r = D/8)."""
    from accel.kernels.ds_attention import ds_decode_attention
    from accel.kernels.ds_attention.cpu import dense_decode_cpu, ds_attend_cpu, ds_select_cpu

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    r = r or D // 8
    budget = max(1, int(T * fraction))
    q = torch.randn(1, H, 1, D, generator=g).to(dt)
    k = torch.randn(1, KVH, T, D, generator=g).to(dt)
    v = torch.randn(1, KVH, T, D, generator=g).to(dt)
    channels = torch.stack([torch.randperm(D, generator=g)[:r] for _ in range(KVH)])
    labels = torch.gather(k, 3, channels[None, :, None, :].expand(1, KVH, T, r)).contiguous()
    idx = ds_select_cpu(q, labels, channels, budget)
    fns = {
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "grouped_matmul": lambda: dense_decode_cpu(q, k, v),
        "ds": lambda: ds_decode_attention(q, k, v, labels, channels, budget, path="cpu"),
        "ds_select": lambda: ds_select_cpu(q, labels, channels, budget),
        "ds_attend": lambda: ds_attend_cpu(q, k, v, idx),
    }
    with torch.inference_mode():
        times = _timed_rounds(fns, rounds)
    med = {n: statistics.median(ts) * 1e3 for n, ts in times.items()}
    low = {n: min(ts) * 1e3 for n, ts in times.items()}
    best = min(low["sdpa"], low["grouped_matmul"])
    es = torch.finfo(dt).bits // 8
    dense_bytes = 2 * KVH * T * D * es
    ds_bytes = KVH * T * r * es + 2 * KVH * budget * D * es
    return {
        "T": T, "H": H, "KVH": KVH, "D": D, "dtype": dtype, "budget": budget, "r": r,
        "ms": {n: round(x, 3) for n, x in low.items()},
        "ms_median": {n: round(x, 3) for n, x in med.items()},
        "best_dense": "sdpa" if low["sdpa"] < low["grouped_matmul"] else "grouped_matmul",
        "speedup": best / low["ds"],
        "speedup_median": min(med["sdpa"], med["grouped_matmul"]) / med["ds"],
        # Per round, best dense / DS measured back to back (same background load); median over rounds.
        "speedup_paired": statistics.median(
            min(a, b) / c for a, b, c in zip(times["sdpa"], times["grouped_matmul"], times["ds"])),
        "speedup_vs_sdpa": low["sdpa"] / low["ds"],
        # Bytes each must read: dense K+V vs labels + the gathered K/V rows (the ~8x ceiling).
        "byte_ratio": dense_bytes / ds_bytes,
    }


# ---------------------------------------------------------------------------------------------
# End to end: SmolLM2 greedy decode after a long prompt, dense vs DS.


class _OnTheFlyDS:
    """Minimal DS attention handler for the benchmark when no runtime patch is available.

    Decode steps go to `ds_decode_attention`; everything else is SDPA. Labels live in a buffer of
    this handler, appended one token per step (recomputed from K whenever the lengths disagree)."""

    kernel_path = "ds-cpu (bench handler)"

    def __init__(self, channels: torch.Tensor, fraction: float, min_context: int):
        self.channels, self.fraction, self.min_context = channels, fraction, min_context
        self.sdpa = compat.sdpa_attention_forward
        self.buf, self.n = None, 0

    def reset(self) -> None:
        self.buf, self.n = None, 0

    def _labels(self, key: torch.Tensor) -> torch.Tensor:
        B, KVH, T, D = key.shape
        r = self.channels.shape[1]
        if self.buf is None or self.buf.shape[2] < T or self.buf.shape[0] != B:
            self.buf = torch.empty(B, KVH, T + 512, r, dtype=key.dtype, device=key.device)
            self.n = 0
        if self.n == T - 1:
            self.buf[:, :, T - 1] = key[:, :, T - 1, :].gather(2, self.channels[None].expand(B, KVH, r))
        elif self.n != T:
            self.buf[:, :, :T] = key.gather(3, self.channels[None, :, None, :].expand(B, KVH, T, r))
        self.n = T
        return self.buf[:, :, :T]

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        from accel.kernels.ds_attention import ds_decode_attention
        labels = self._labels(key)
        T = key.shape[2]
        if query.shape[2] != 1 or T < self.min_context:
            return self.sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        out = ds_decode_attention(query, key, value, labels, self.channels, max(1, int(T * self.fraction)),
                                  scaling=scaling)
        return out.transpose(1, 2), None


def _patch_bench_handler(model, prompt_k_stats: dict, fraction: float, r: int, n_dense: int = 2) -> list:
    """Register `_OnTheFlyDS` on every attention layer but the first n_dense, through PatchContext
    (so `accel.unpatch` restores the model). Channels: top-r of mean |k| per KV head of the prompt."""
    from accel.patches.core import PatchContext, PatchState

    state = PatchState()
    ctx = PatchContext(model, state, "ds-bench")
    handlers = []
    for i, layer in enumerate(compat.decoder_layers(model)):
        if i < n_dense:
            continue
        channels = prompt_k_stats[i].topk(r, dim=-1).indices.contiguous()
        h = _OnTheFlyDS(channels, fraction, min_context=1024)
        ctx.set_attention_handler(f"model.layers.{i}.self_attn", layer.self_attn, h, detail="bench handler")
        handlers.append(h)
    model.__dict__["_accel_state"] = state
    return handlers


def _decode(model, cache, first_token: torch.Tensor, n: int) -> tuple[list[float], list[int]]:
    """Greedy decode n tokens from a prefilled cache; per-step seconds and the tokens."""
    tok, times, out = first_token, [], []
    for _ in range(n):
        t0 = time.perf_counter()
        logits = model(input_ids=tok, **compat.cache_kwargs(cache), use_cache=True).logits
        tok = logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - t0)
        out.append(int(tok))
    return times, out


def bench_e2e(context: int = 4096, new_tokens: int = 16, fraction: float = 1 / 16, dtype: str = "float32",
              rounds: int = 2, use_runtime: bool | None = None) -> dict:
    """SmolLM2 decode tokens/s with a `context`-token prompt, dense vs DS (1/fraction budget, r=D/8).

    Variants decoded from copies of the same prefilled DynamicCache, interleaved over `rounds`:
    dense (transformers' SDPA), "ds_runtime" (the Double Sparsity runtime patch via `accel.patch`,
    when this build has it; use_runtime=False skips it) and "ds_handler" (this module's minimal
    handler: labels appended into a preallocated buffer). e2e_speedup uses ds_runtime if present.
    """
    import copy

    import accel
    from accel.data import eval_tokens

    model, tok = accel.models.load("smollm2-135m", dtype=dtype)
    ids = eval_tokens(tok, "wiki", context + 1)[None, : context]
    tc = compat.text_config(model.config)
    D = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    r = D // 8
    with torch.inference_mode():
        cache = compat.DynamicCache(config=model.config)
        t0 = time.perf_counter()
        logits = model(input_ids=ids, **compat.cache_kwargs(cache), use_cache=True).logits
        prefill_s = time.perf_counter() - t0
        first = logits[:, -1:].argmax(-1)
        # Mean |k| (post-RoPE) per layer/KV head/channel from the prompt: a stand-in for calibrated
        # channels. Speed does not depend on which channels are chosen.
        stats = {i: layer.keys.abs().mean(dim=(0, 2)) for i, layer in enumerate(cache.layers)}
        runtime = _runtime_patch(model, stats, fraction, r) if use_runtime is not False else None
        if runtime is None and use_runtime:
            raise RuntimeError("the Double Sparsity runtime patch is not available in this build")
        variants = ["dense", "ds_handler"] + (["ds_runtime"] if runtime is not None else [])
        times = {n: [] for n in variants}
        toks = {}
        for _ in range(rounds):
            for name in variants:
                if name == "ds_runtime":
                    accel.patch(model, runtime)
                elif name == "ds_handler":
                    _patch_bench_handler(model, stats, fraction, r)
                c = copy.deepcopy(cache)
                ts, out = _decode(model, c, first, new_tokens + 1)
                times[name] += ts[1:]   # the first step (re)builds label buffers: not steady state
                toks[name] = out
                accel.unpatch(model)
    med = {n: statistics.median(ts) for n, ts in times.items()}
    main = "ds_runtime" if runtime is not None else "ds_handler"
    res = {"context": context, "new_tokens": new_tokens, "dtype": dtype, "fraction": fraction, "r": r,
           "mode": "runtime" if runtime is not None else "bench-handler", "prefill_s": prefill_s,
           "dense_tok_s": 1 / med["dense"], "ds_tok_s": 1 / med[main], "e2e_speedup": med["dense"] / med[main]}
    for n in variants[1:]:
        res[f"{n}_tok_s"] = 1 / med[n]
        res[f"{n}_speedup"] = med["dense"] / med[n]
        res[f"{n}_greedy_agreement"] = sum(a == b for a, b in zip(toks["dense"], toks[n])) / len(toks["dense"])
    return res


def _runtime_patch(model, stats: dict, fraction: float, r: int):
    """An in-memory Artifact for `accel.patch` using the Double Sparsity runtime (label cache layer,
    dense prefill, first 2 layers dense), with channel orders from the prompt's mean |k|; None when
    the runtime is not part of this build."""
    try:
        from accel.configs.double_sparsity import DoubleSparsityConfig
        from accel.patches import double_sparsity  # noqa: F401  (registers the method)
    except ImportError:
        return None
    from accel.artifact import Artifact

    order = torch.stack([stats[i].argsort(dim=-1, descending=True) for i in sorted(stats)])   # [L, KVH, D]
    # min_context as the bench handler's: the point is to time sparse decode steps, not the fallback.
    cfg = DoubleSparsityConfig(budget=fraction, heavy_channels=r, channel_type="k", min_context=1024)
    return Artifact.for_model(model, [cfg], tensors={"double-sparsity/order_k": order.contiguous()})


def run_bench(contexts=(8192, 32768), dtypes=("float32", "bfloat16"), fraction: float = 1 / 16,
              rounds: int = 9, e2e_context: int = 4096, e2e_tokens: int = 16, e2e: bool = True,
              threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    load0 = os.getloadavg()[0]
    rows = []
    for dtype in dtypes:
        for name, (H, KVH, D) in ATTN_SHAPES.items():
            for T in contexts:
                row = bench_attention(T, H, KVH, D, dtype, fraction, rounds=rounds)
                row["shape"] = name
                rows.append(row)
                log.info("%s %s T=%d: DS %.2f ms, best dense %.2f ms -> %.2fx", name, dtype, T,
                         row["ms"]["ds"], row["ms"][row["best_dense"]], row["speedup"])
    res = {"threads": threads, "fraction": fraction, "rows": rows}
    main = {(r_["T"]): r_ for r_ in rows if r_["shape"] == "llama-8b" and r_["dtype"] == dtypes[0]}
    for T, key in ((8192, "speedup_8k"), (32768, "speedup_32k")):
        if T in main:
            res[key] = main[T]["speedup"]
    if e2e:
        res["e2e"] = bench_e2e(e2e_context, e2e_tokens, fraction, dtypes[0])
        res["e2e_speedup"] = res["e2e"]["e2e_speedup"]
    res["load_avg_start_end"] = [load0, os.getloadavg()[0]]
    return res


def format_table(res: dict) -> str:
    lines = [f"DS decode attention vs best dense, CPU, {res['threads']} thread, budget {res['fraction']:.4g} of T, "
             f"r = D/8 (min ms over interleaved rounds; speedup = min/min, median/median beside it)",
             f"{'shape':9s} {'dtype':8s} {'T':>6s} {'sdpa':>8s} {'gmm':>8s} {'ds':>7s} {'select':>7s} "
             f"{'attend':>7s} {'speedup':>8s} {'(median)':>8s} {'(paired)':>8s} {'vs sdpa':>8s} {'bytes':>6s}"]
    for r_ in res["rows"]:
        m = r_["ms"]
        lines.append(f"{r_['shape']:9s} {r_['dtype']:8s} {r_['T']:6d} {m['sdpa']:8.2f} {m['grouped_matmul']:8.2f} "
                     f"{m['ds']:7.2f} {m['ds_select']:7.2f} {m['ds_attend']:7.2f} {r_['speedup']:7.2f}x "
                     f"{r_['speedup_median']:7.2f}x {r_['speedup_paired']:7.2f}x "
                     f"{r_['speedup_vs_sdpa']:7.2f}x {r_['byte_ratio']:5.1f}x")
    if "e2e" in res:
        e = res["e2e"]
        lines.append(f"end to end SmolLM2 ({e['dtype']}, {e['context']}-token prompt, {e['new_tokens']} greedy "
                     f"tokens, median step): dense {e['dense_tok_s']:.2f} tok/s")
        for n, what in (("ds_runtime", "DS runtime patch (accel.patch)"),
                        ("ds_handler", "DS bench handler (labels in a preallocated buffer)")):
            if f"{n}_tok_s" in e:
                lines.append(f"  {what}: {e[f'{n}_tok_s']:.2f} tok/s -> {e[f'{n}_speedup']:.2f}x "
                             f"(greedy tokens equal to dense: {e[f'{n}_greedy_agreement']:.0%})")
    lines.append(f"load average at start/end: {res['load_avg_start_end'][0]:.1f} / {res['load_avg_start_end'][1]:.1f}")
    return "\n".join(lines)
