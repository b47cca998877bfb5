"""`accel bench ds-offload`: Double Sparsity-Offload memory, traffic, speed and prediction hit rate.

1. Synthetic long context (default 16K and 32K tokens): a random 2-layer Llama with larger heads
   (8 KV heads x head_dim 128, fp32), every layer sparse (n_dense=0). The context's K/V are
   synthetic (random, a few heavy channels), written straight into the caches — a dense prefill
   of 32K tokens is out of reach on a shared 2-core CPU — then real decode steps run through the
   patched model: in-memory DS vs offload="disk" with the same budget. Reports the bytes ratios,
   the tokens/s ratio and whether the greedy tokens and logits agree.
2. A memory cap (`--mem-cap-mb`): a child process fills a disk-offloaded cache whose dense K/V
   exceed the cap, chunk by chunk, decodes, and reports its peak RSS (the kernel's VmHWM, reset
   after loading); its logits are compared with the in-memory run of part 1. The cap is on the
   RSS added after loading (python + torch + transformers alone take ~430 MB here, > 256 MB).
3. SmolLM2 on real text (--smol-context tokens, channels calibrated on a small sample): the hit
   rate of the predicted selection (offload_select="predicted") against the exact one, and the
   greedy tokens of offload="disk" (exact) against in-memory DS.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from accel.patches import compat

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB = 1024, 8, 8, 128, 2, 1024
CHUNK = 1024


def synthetic_model():
    """accel's tiny Llama with the bench's larger heads (fp32, seeded)."""
    import accel

    model = accel.models.tiny("llama", seed=0, vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=1024,
                              num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                              head_dim=HEAD_DIM, max_position_embeddings=65536 + 256)
    model.config.accel_source = "synthetic-ds-offload"
    return model


def channel_scale(layer: int) -> torch.Tensor:
    """[KVH, D] per-channel K scale: a few heavy channels per head (what DS calibration finds)."""
    g = torch.Generator().manual_seed(1000 + layer)
    s = torch.rand(KV_HEADS, HEAD_DIM, generator=g) * 0.5 + 0.5
    heavy = torch.rand(KV_HEADS, HEAD_DIM, generator=g).argsort(-1)[:, :HEAD_DIM // 8]
    return s.scatter(1, heavy, 4.0)


def synthetic_chunk(layer: int, c: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [1, KVH, n, D] of chunk c (deterministic in (layer, c), whatever the process)."""
    g = torch.Generator().manual_seed(layer * 100003 + c)
    k = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g) * channel_scale(layer)[None, :, None, :]
    return k, torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g)


def artifact(model, **kw):
    import accel
    from accel.configs.double_sparsity import DoubleSparsityConfig
    order = torch.stack([channel_scale(i).argsort(-1, descending=True) for i in range(LAYERS)])
    cfg = DoubleSparsityConfig(budget=kw.pop("budget"), n_dense=0, min_context=512, **kw)
    return accel.Artifact.for_model(model, [cfg], tensors={"double-sparsity/order_qk": order})


def fill(cache, context: int, offloaded: bool) -> None:
    from accel.patches.ds_offload_cache import OffloadedDSLayer
    for c in range(0, context, CHUNK):
        n = min(CHUNK, context - c)
        for i in range(LAYERS):
            k, v = synthetic_chunk(i, c // CHUNK, n)
            if offloaded:
                layer = cache.layers[i]
                assert isinstance(layer, OffloadedDSLayer)
                layer.extend(k, v)
            else:
                cache.update(k, v, i)


def offloaded_cache(model):
    """A DynamicCache whose layers are converted to offloaded ones (by one tiny forward's hooks)."""
    from accel.patches.ds_offload_cache import OffloadedDSLayer
    cache = compat.DynamicCache(config=model.config)
    for i, layer in enumerate(compat.decoder_layers(model)):
        for hook in layer.self_attn._forward_pre_hooks.values():
            hook(layer.self_attn, (), compat.cache_kwargs(cache))
        assert isinstance(cache.layers[i], OffloadedDSLayer)
    return cache


def decode(model, cache, context: int, steps: int, first_token: int = 1):
    """Greedy decode `steps` tokens after a `context`-token cache -> (tokens, logits [steps, V], s/token)."""
    tok = torch.tensor([[first_token]])
    toks, logits, times = [], [], []
    with torch.no_grad():
        for s in range(steps):
            mask = torch.ones(1, context + s + 1, dtype=torch.long)
            t0 = time.perf_counter()
            out = model(tok, attention_mask=mask, **compat.cache_kwargs(cache), use_cache=True).logits[:, -1]
            times.append(time.perf_counter() - t0)
            tok = out.argmax(-1, keepdim=True)
            toks.append(int(tok))
            logits.append(out[0])
    times.sort()
    return toks, torch.stack(logits), times[len(times) // 2]


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS mark (VmHWM) so it covers only what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_run(context: int, steps: int, inv_fraction: int, offload_dir: str | None) -> dict:
    import accel
    from accel.patches.ds_offload import offload_stats
    model = synthetic_model()
    budget = 1 / inv_fraction
    res = {"context": context}
    with accel.patched(model, artifact(model, budget=budget)):
        cache = compat.DynamicCache(config=model.config)
        fill(cache, context, offloaded=False)
        ref_toks, ref_logits, ref_s = decode(model, cache, context, steps)
        del cache
    with accel.patched(model, artifact(model, budget=budget, offload="disk", offload_dir=offload_dir)):
        cache = offloaded_cache(model)
        fill(cache, context, offloaded=True)
        st0 = offload_stats(model)
        toks, logits, off_s = decode(model, cache, context, steps)
        st = offload_stats(model)
        del cache
    dense = st["dense_kv_bytes"]
    res.update(
        dense_kv_mb=dense / 2**20, device_mb=st["device_bytes"] / 2**20, slow_mb=st["slow_bytes"] / 2**20,
        device_bytes_ratio=st["device_bytes"] / dense,
        moved_bytes_ratio=(st["moved_bytes_total"] - st0["moved_bytes_total"]) / steps / dense,
        tokens_per_s_ds=1 / ref_s, tokens_per_s_offload=1 / off_s, tokens_per_s_ratio=ref_s / off_s,
        tokens_equal=toks == ref_toks, max_logit_diff=float((logits - ref_logits).abs().max()))
    return res, ref_toks, ref_logits


def capped_child(context: int, steps: int, inv_fraction: int, offload_dir: str | None, out_path: str) -> None:
    """Runs in a subprocess: disk-offloaded fill + decode, writes logits and RSS numbers."""
    import accel
    torch.set_num_threads(1)
    model = synthetic_model()
    with accel.patched(model, artifact(model, budget=1 / inv_fraction, offload="disk", offload_dir=offload_dir)):
        cache = offloaded_cache(model)
        load_peak = peak_rss_mb()
        reset_peak_rss()
        base = rss_now_mb()
        fill(cache, context, offloaded=True)
        toks, logits, _ = decode(model, cache, context, steps)
        peak = peak_rss_mb()
    torch.save({"toks": toks, "logits": logits, "base_rss_mb": base, "peak_rss_mb": peak,
                "load_peak_rss_mb": load_peak}, out_path)


def smol_run(context: int, steps: int, inv_fraction: int, offload_dir: str | None) -> dict:
    import accel
    import accel.data
    from accel.calibrate.double_sparsity import calibrate_double_sparsity
    from accel.configs.double_sparsity import DoubleSparsityConfig
    from accel.patches.ds_offload import offload_stats
    model, tok = accel.models.load("smollm2-135m")
    ids = accel.data.eval_tokens(tok, "wiki", context)[None]
    cal = calibrate_double_sparsity(model, tok, DoubleSparsityConfig(min_context=512), n_samples=8, seq_len=256, progress=False)
    tensors = cal.tensors

    def run(**kw):
        cfg = DoubleSparsityConfig(budget=1 / inv_fraction, min_context=512, **kw)
        art = accel.Artifact.for_model(model, [cfg], tensors=tensors)
        with accel.patched(model, art):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                                 return_dict_in_generate=True)
            st = offload_stats(model)
        # Drop the cache (and its slow-tier files) before the next run.
        setattr(out, compat.CACHE_KWARG, None)
        return out.sequences[0, context:].tolist(), st

    ref, _ = run()
    exact, st_e = run(offload="disk", offload_dir=offload_dir)
    pred, st_p = run(offload="disk", offload_dir=offload_dir, offload_select="predicted")
    return {"context": context, "tokens_equal_exact": exact == ref, "hit_rate": st_p["hit_rate"],
            "predicted_tokens_agree": sum(a == b for a, b in zip(pred, ref)) / len(ref),
            "device_bytes_ratio": st_e["device_bytes"] / st_e["dense_kv_bytes"],
            "moved_bytes_ratio": st_e["moved_bytes_per_token"] / st_e["dense_kv_bytes"]}


def run_bench(contexts=(16384, 32768), steps: int = 8, inv_fraction: int = 16, mem_cap_mb: float = 256,
              smol_context: int = 2048, smol: bool = True, offload_dir: str | None = None) -> dict:
    synth, ref_toks, ref_logits = [], None, None
    for ctx in sorted(contexts):
        r, ref_toks, ref_logits = synthetic_run(ctx, steps, inv_fraction, offload_dir)
        synth.append(r)
    big = max(contexts)
    with tempfile.TemporaryDirectory() as td:
        out = os.path.join(td, "child.pt")
        code = ("from accel.eval.bench_ds_offload import capped_child; "
                f"capped_child({big}, {steps}, {inv_fraction}, {offload_dir!r}, {out!r})")
        subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        child = torch.load(out)
    kv_rss = child["peak_rss_mb"] - child["base_rss_mb"]
    cap = {"context": big, "dense_kv_mb": synth[-1]["dense_kv_mb"], "mem_cap_mb": mem_cap_mb,
           "base_rss_mb": child["base_rss_mb"], "peak_rss_mb": child["peak_rss_mb"], "added_rss_mb": kv_rss,
           "load_peak_rss_mb": child["load_peak_rss_mb"],
           "within_cap": kv_rss <= mem_cap_mb, "exceeds_cap_dense": synth[-1]["dense_kv_mb"] > mem_cap_mb,
           "tokens_equal": child["toks"] == ref_toks,
           "max_logit_diff": float((child["logits"] - ref_logits).abs().max())}
    last = synth[-1]
    res = {"device_bytes_ratio": last["device_bytes_ratio"], "moved_bytes_ratio": last["moved_bytes_ratio"],
           "tokens_per_s_ratio": last["tokens_per_s_ratio"], "hit_rate": None, "synthetic": synth, "mem_cap": cap,
           "setup": f"synthetic llama {LAYERS} layers, {KV_HEADS} KV heads x head_dim {HEAD_DIM}, fp32, n_dense=0, "
                    f"budget 1/{inv_fraction}, r=D/8 16-bit labels, offload=disk, 1 thread"}
    if smol:
        res["smollm2"] = smol_run(smol_context, steps, inv_fraction, offload_dir)
        res["hit_rate"] = res["smollm2"]["hit_rate"]
    return res
