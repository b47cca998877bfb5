"""Double Sparsity-Offload: the runtime side (handler, hooks, accounting).

With `DoubleSparsityConfig(offload="cpu"|"disk")`, every full-attention layer's cache layer becomes
an `OffloadedDSLayer` (patches/ds_offload_cache.py) the first time the layer runs with a
transformers Cache: K/V live in the slow tier, labels + sink + recent tail on the compute device.

- Sparse layers' decode steps go through `OffloadDSAttention`: select (exact: this layer's query;
  predicted: see below), fetch only the selected rows in one batched copy, attend over them.
- Dense layers (`n_dense`) read their K/V back each step (a transient copy, counted as moved).
- `offload_select="predicted"`: a pre-hook on layer i-1's attention projects its (normed) input
  hidden state through layer i's q projection (+ q_norm, RoPE), selects against layer i's labels
  and starts the fetch (on CUDA on a side stream, `accel.offload.prefetch`). Layer i still computes
  the exact selection to count how often the prediction agrees (`hit_rate`, over the top-k slots,
  not the always-kept sink/recent ones).
- `offload_stats(model)` / the "cache" row of `accel.report(model)`: bytes on the compute device,
  in the slow tier, moved per decoded token, hit rate, for the most recent cache.
"""
from __future__ import annotations

import logging
import weakref

import torch

from accel.kernels.ds_attention import ds_attend_rows, ds_select
from accel.offload.store import OffloadError

from . import compat
from .ds_handler import DSAttention
from .ds_offload_cache import OffloadedDSLayer, OffloadSession
from .kv_press import key_mask_from, layer_of

log = logging.getLogger(__name__)
FLUSH_TOKENS = 64


def _hits(session: OffloadSession, pred: torch.Tensor, exact: torch.Tensor, T: int, forced: int) -> None:
    B, KVH, n = exact.shape
    mark = torch.zeros(B, KVH, T, dtype=torch.bool, device=exact.device).scatter_(2, exact, True)
    hits = int(mark.gather(2, pred.clamp_max(T - 1)).sum())
    # Sink and recent tokens are in both selections by construction: count only the top-k slots.
    f = B * KVH * min(forced, n)
    session.hits += hits - f
    session.hit_total += exact.numel() - f


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def predict_query(attn, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Layer `attn`'s query from another layer's normed input hidden [B, 1, hidden] -> [B, H, 1, D]."""
    B, L, _ = hidden.shape
    q = attn.q_proj(hidden).view(B, L, -1, attn.head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    q = q.transpose(1, 2)
    cos, sin = (t.unsqueeze(1) for t in position_embeddings)
    return q * cos + _rotate_half(q) * sin


class OffloadDSAttention(DSAttention):
    """The DS handler for a layer whose cache is offloaded (an `OffloadedDSLayer`; any other cache
    layer is served as in memory)."""

    def with_cache(self, module, query, key, value, attention_mask, layer, **kwargs):
        if not isinstance(layer, OffloadedDSLayer):
            return super().with_cache(module, query, key, value, attention_mask, layer, **kwargs)
        session, cfg = layer.session, self.cfg
        session.check()
        Tq = query.shape[2]
        try:
            if Tq != 1 or layer.length < max(cfg.min_context, 1):
                layer.pending = None
                if Tq == 1:
                    key, value = layer.read_all()
                out = self.dense(module, query, key, value, attention_mask, **kwargs)
            else:
                out = (self._decode(layer, query, attention_mask, kwargs.get("scaling")).transpose(1, 2).contiguous(),
                       None)
            layer.settle()
        except OffloadError as e:
            session.fail(e)
            raise
        return out

    def _decode(self, layer, query, attention_mask, scaling):
        cfg, session = self.cfg, layer.session
        B, T = query.shape[0], layer.length
        key_mask = key_mask_from(attention_mask, B, T, query.device)
        budget = cfg.budget_tokens(T)
        channels = self.channels.to(query.device)
        exact = ds_select(query, layer.labels(query.dtype), channels, budget, cfg.sink, cfg.recent,
                          cfg.group_reduce, key_mask)
        plan, layer.pending = layer.pending, None
        if plan is not None and plan.get("T") == T:
            _hits(session, plan["idx"], exact, T, min(budget, cfg.sink + cfg.recent))
        else:
            plan = layer.fetch_plan(exact, key_mask)
        k, v, ok = layer.assemble(plan)
        self.counts["sparse_decode"] += 1
        return ds_attend_rows(query, k, v, ok, scaling)


class OffloadReport:
    """The live "cache" row of `accel.report`: str() gives the numbers of the latest cache."""

    def __init__(self, kind: str):
        self.kind, self.kernel_path = kind, f"offload-{kind}"
        self.session_ref = None
        self.sessions: weakref.WeakSet = weakref.WeakSet()

    def __deepcopy__(self, memo):
        # A deep-copied model starts without caches: its report must not count the original's.
        new = OffloadReport(self.kind)
        memo[id(self)] = new
        return new

    def detach(self) -> None:
        # After unpatch no handler serves these caches: plain attention would see only the
        # device tail, so any further use must fail loudly.
        for s in list(self.sessions):
            s.fail("the model was unpatched; an offloaded cache needs the offload patch")

    def stats(self) -> dict | None:
        s = self.session_ref() if self.session_ref is not None else None
        return None if s is None else session_stats(s)

    def __str__(self) -> str:
        st = self.stats()
        if st is None:
            return "no cache yet"
        hr = "n/a" if st["hit_rate"] is None else f"{st['hit_rate']:.3f}"
        return (f"device {st['device_bytes'] / 2**20:.2f} MiB, slow tier {st['slow_bytes'] / 2**20:.2f} MiB, "
                f"moved {st['moved_bytes_per_token'] / 2**10:.1f} KiB/token, dense KV "
                f"{st['dense_kv_bytes'] / 2**20:.2f} MiB, hit rate {hr}")


def session_stats(s: OffloadSession) -> dict:
    layers = list(s.layers.values())
    moved = sum(l.store.bytes_read + l.store.bytes_written for l in layers if l.store is not None)
    pf = s.prefetcher.nbytes if s.prefetcher is not None else 0
    # Fetch buffers: the assembled selection of one layer plus the next layer's pending fetch.
    device = sum(l.device_bytes() for l in layers) + 2 * s.buffer_bytes + pf
    return {
        "kind": s.kind, "layers": len(layers), "device_bytes": device,
        "slow_bytes": sum(l.store.nbytes for l in layers if l.store is not None),
        "dense_kv_bytes": sum(l.dense_bytes() for l in layers),
        "moved_bytes_total": moved, "decode_tokens": s.decode_tokens,
        "moved_bytes_per_token": (moved - s.decode_start) / s.decode_tokens if s.decode_tokens else 0.0,
        "hit_rate": s.hits / s.hit_total if s.hit_total else None,
        "hits": s.hits, "hit_total": s.hit_total,
    }


def _session_for(cache, cfg, device, report: OffloadReport) -> OffloadSession:
    s = cache.__dict__.get("_accel_offload")
    if s is None:
        prefetcher = None
        if cfg.offload == "cpu" and torch.device(device).type == "cuda":
            from accel.offload.prefetch import CudaPrefetcher
            prefetcher = CudaPrefetcher(device)
        s = OffloadSession(cfg.offload, cfg.offload_dir, prefetcher=prefetcher)
        cache.__dict__["_accel_offload"] = s
        report.session_ref = weakref.ref(s)
        report.sessions.add(s)
    return s


class _ConvertHook:
    """Pre-hook on layer i's attention: turn its cache layer into an `OffloadedDSLayer`.

    A callable object rather than a closure, so that a deep-copied model's hook refers to the
    copy's report (copy.deepcopy keeps functions as they are)."""

    def __init__(self, i: int, channels, cfg, report: "OffloadReport"):
        self.i, self.channels, self.cfg, self.report = i, channels, cfg, report

    def __call__(self, module, args, kwargs):
        i, cfg = self.i, self.cfg
        cache = compat.cache_from_kwargs(kwargs)
        if cache is None or not hasattr(cache, "layers"):
            return
        layers = cache.layers
        if len(layers) <= i and cache.layer_class_to_replicate is not None:
            while len(layers) <= i:
                layers.append(cache.layer_class_to_replicate())
        layer = layers[i]
        if isinstance(layer, OffloadedDSLayer):
            return
        if not isinstance(layer, compat.DynamicLayer) or getattr(layer, "is_sliding", False):
            raise OffloadError(f"double-sparsity offload: layer {i} has a {type(layer).__name__} cache layer; "
                               "offload works on DynamicCache (the default of generate())")
        session = _session_for(cache, cfg, module.q_proj.weight.device, self.report)
        new = OffloadedDSLayer(session, i, self.channels, cfg.label_bits, cfg.sink, keep=cfg.recent,
                               flush=FLUSH_TOKENS)
        if layer.get_seq_length() > 0:
            # A cache filled before (by a non-offloaded run): move its K/V to the slow tier.
            new.extend(layer.keys, layer.values)
        layers[i] = new


class _PredictHook:
    """Pre-hook on layer j-1's attention: predict layer j's selection and start its fetch.
    (A callable object holding layer j's attention: deep-copied with the model.)"""

    def __init__(self, j: int, target_attn, channels, cfg):
        self.j, self.target_attn, self.channels, self.cfg = j, target_attn, channels, cfg

    def __call__(self, module, args, kwargs):
        cfg = self.cfg
        layer = layer_of(compat.cache_from_kwargs(kwargs), self.j)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        pe = kwargs.get("position_embeddings")
        if not isinstance(layer, OffloadedDSLayer) or not layer.is_initialized or hidden is None or pe is None \
                or hidden.shape[1] != 1 or layer.session.broken is not None:
            return
        T = layer.length + 1
        if T < max(cfg.min_context, 1):
            return
        with torch.no_grad():
            q = predict_query(self.target_attn, hidden, pe)
            key_mask = key_mask_from(kwargs.get("attention_mask"), q.shape[0], T, q.device)
            # Layer j has not appended this step's token yet: one zero label row stands in for it
            # (it is always kept as a recent token).
            idx = ds_select(q, layer.labels(q.dtype, extra=1), self.channels.to(q.device), cfg.budget_tokens(T),
                               cfg.sink, cfg.recent, cfg.group_reduce, key_mask)
            plan = layer.fetch_plan(idx, key_mask)
        plan["T"] = T
        layer.pending = plan


def install_offload(ctx, cfg, model, sparse: dict[int, torch.Tensor], is_sliding) -> None:
    """Hook every full-attention layer: cache conversion, and with offload_select="predicted" the
    next layer's prediction. sparse: {layer index: channels [KVH, r]} of the DS layers."""
    if cfg.offload == "disk":
        # Fail at patch time, not inside generate(), when the directory cannot take files.
        OffloadSession("disk", cfg.offload_dir).close()
    report = OffloadReport(cfg.offload)
    layers = compat.decoder_layers(model)
    full = [i for i in range(len(layers)) if not is_sliding(i)]
    for i in full:
        attn = layers[i].self_attn
        ctx.add_hook(attn, _ConvertHook(i, sparse.get(i), cfg, report), pre=True)
        j = i + 1
        if cfg.offload_select == "predicted" and j in sparse and j in full:
            ctx.add_hook(attn, _PredictHook(j, layers[j].self_attn, sparse[j], cfg), pre=True)
    ctx.add_row(compat.CACHE_KWARG, "cache", target=report, detail=report)
    ctx.set_dict_entry(model, "_accel_offload_report", report)
    ctx.on_undo(report.detach)


def offload_stats(model) -> dict | None:
    """The accounting of the most recent offloaded cache of a patched model (None before one ran)."""
    rep = model.__dict__.get("_accel_offload_report")
    return None if rep is None else rep.stats()
