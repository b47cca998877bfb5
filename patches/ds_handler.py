"""The Double Sparsity attention handler of one sparse layer (a `kv_press.PressHandler`).

- Decode steps (one query token, a KV cache, context >= min_context) attend to `budget` tokens
  chosen by the r calibrated channels (`accel.kernels.ds_attention.ds_decode_attention`), reading
  the labels from the cache layer (`DSLabelLayer`, which each plain `DynamicLayer` is upgraded to
  on first use).
- Prefill (several query tokens with a cache) is dense; the cache layer labels the prompt.
- A static cache (`cache_implementation="static"`, compiled decode): its layers become
  `DSStaticLabelLayer`s, and a decode step reads only the filled prefix inside the op
  (`ds_decode_attention_static`), so the step has fixed shapes and no data-dependent Python.
- Scoring forwards (no cache: perplexity, lm-eval loglikelihood) apply the same selection causally
  to every query row when `score_mode="sparse"` (`ds_causal_attention`), so perplexity measures
  the sparsity.
"""
from __future__ import annotations

import logging

import torch

from accel.configs.double_sparsity import DoubleSparsityConfig
from accel.kernels.dispatch import select_path
from accel.kernels.ds_attention import (dense_cpu, ds_causal_attention, ds_decode_attention,
                                        ds_decode_attention_static, gather_labels)

from .ds_cache import DSLabelLayer, DSStaticLabelLayer, GrowingLayer, fake_quantize_labels
from .kv_press import PressHandler, allowed_from_mask

log = logging.getLogger(__name__)


def dense_step(handler: PressHandler, module, query, key, value, attention_mask, **kwargs):
    """A dense forward of a DS layer: a decode step (one query token over every cached key) on the
    native CPU kernel (`dense_cpu`), anything else on `handler.dense` (SDPA): several query rows,
    not CPU, a layout or dtype it does not take, under torch.compile (the graph keeps SDPA),
    training with dropout, logit soft-capping, attention sinks, or a sliding window shorter than
    the context. Returns (attn_output [B, Tq, H, D], None) as an attention function does."""
    if (query.shape[2] != 1 or torch.compiler.is_compiling() or (module.training and kwargs.get("dropout", 0.0))
            or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
            or (kwargs.get("sliding_window") or key.shape[2]) < key.shape[2]
            or not dense_cpu.usable(query, key, value)):
        return handler.dense(module, query, key, value, attention_mask, **kwargs)
    B, Tk = query.shape[0], key.shape[2]
    key_mask = None if attention_mask is None else allowed_from_mask(attention_mask, B, 1, Tk, query.device)[:, 0]
    scaling = kwargs.get("scaling")
    out = dense_cpu.dense_decode(query, key, value, query.shape[-1] ** -0.5 if scaling is None else scaling, key_mask)
    handler.count("dense_decode")
    return out.transpose(1, 2).contiguous(), None


class DSDenseLayer(PressHandler):
    """The handler of a layer Double Sparsity leaves dense (the first `n_dense`): SDPA, except that
    a CPU decode step runs the native dense decode kernel (`dense_step`), ~7x torch's
    flash attention at one query row and an 8K context."""

    kernel_path = "dense"

    def __init__(self, layer_idx: int):
        super().__init__(layer_idx)
        self.counts.update(dense_decode=0)

    def upgrade_layer(self, layer):
        return GrowingLayer.from_layer(layer)

    def with_cache(self, module, query, key, value, attention_mask, layer, **kwargs):
        return dense_step(self, module, query, key, value, attention_mask, **kwargs)


class DSAttention(PressHandler):
    """The attention handler of one sparse layer. channels: [KVH, r] int64."""

    def __init__(self, cfg: DoubleSparsityConfig, channels: torch.Tensor, layer_idx: int, device):
        super().__init__(layer_idx)
        self.cfg, self.channels = cfg, channels
        self.kernel_path = f"ds-{select_path(device)}"
        self.counts.update(sparse_decode=0, dense_decode=0, sparse_score=0)

    def upgrade_layer(self, layer):
        keys = getattr(layer, "keys", None)
        device = keys.device if isinstance(keys, torch.Tensor) else self.channels.device
        return DSLabelLayer.from_layer(layer, self.channels.to(device), self.cfg.label_bits)

    def upgrade_static_layer(self, layer):
        keys = getattr(layer, "keys", None)
        device = keys.device if isinstance(keys, torch.Tensor) else self.channels.device
        return DSStaticLabelLayer.from_layer(layer, self.channels.to(device), self.cfg.label_bits)

    def _labels(self, layer, key: torch.Tensor):
        """The label cache for this layer, [B, KVH, T, r] (or `QuantizedLabels`), kept in step with `key`."""
        if isinstance(layer, DSLabelLayer) and layer.keys is key:
            if layer.label_length() != key.shape[2]:
                # Someone changed the keys behind the cache layer's back: relabel everything.
                layer.label_parts = layer._make_parts(key)
            # Quantized labels go to the op as stored (the CPU path scores the codes directly).
            return layer.stored_labels(key.dtype)
        # A cache type without labels (static, quantized, offloaded): label on the fly.
        log.debug("layer %d: cache layer %s has no label cache; gathering labels from K", self.layer_idx,
                  type(layer).__name__)
        return fake_quantize_labels(gather_labels(key, self.channels.to(key.device)), self.cfg.label_bits)

    def with_cache(self, module, query, key, value, attention_mask, layer, **kwargs):
        B, H, Tq, D = query.shape
        Tk = key.shape[2]
        cfg = self.cfg
        if isinstance(layer, DSStaticLabelLayer) and layer.keys is key:
            if Tq != 1:
                return self.dense(module, query, key, value, attention_mask, **kwargs)
            # Static cache: the context length is a tensor (cumulative_length), read inside the op.
            key_mask = allowed_from_mask(attention_mask, B, 1, Tk, query.device)[:, 0]
            out = ds_decode_attention_static(query, key, value, layer.labels(key.dtype), self.channels.to(query.device),
                                             layer.cumulative_length, cfg.budget, cfg.min_context, sink=cfg.sink,
                                             recent=cfg.recent, scaling=kwargs.get("scaling"),
                                             group_reduce=cfg.group_reduce, key_mask=key_mask)
            self.count("sparse_decode")
            return out.transpose(1, 2).contiguous(), None
        if Tq != 1 or Tk < max(cfg.min_context, 1):
            return dense_step(self, module, query, key, value, attention_mask, **kwargs)
        labels = self._labels(layer, key)
        # No mask (generate() without padding): every key is valid; skip building and testing one.
        key_mask = None if attention_mask is None else allowed_from_mask(attention_mask, B, 1, Tk, query.device)[:, 0]
        out = ds_decode_attention(query, key, value, labels, self.channels.to(query.device), cfg.budget_tokens(Tk),
                                  sink=cfg.sink, recent=cfg.recent, scaling=kwargs.get("scaling"),
                                  group_reduce=cfg.group_reduce, key_mask=key_mask)
        self.count("sparse_decode")
        return out.transpose(1, 2).contiguous(), None

    def without_cache(self, module, query, key, value, attention_mask, **kwargs):
        B, H, Tq, D = query.shape
        Tk = key.shape[2]
        cfg = self.cfg
        budget = cfg.budget_tokens(Tk)
        if Tq == 1 or cfg.score_mode != "sparse" or budget >= Tk:
            return self.dense(module, query, key, value, attention_mask, **kwargs)
        channels = self.channels.to(key.device)
        labels = fake_quantize_labels(gather_labels(key, channels), cfg.label_bits)
        allowed = allowed_from_mask(attention_mask, B, Tq, Tk, query.device)
        out = ds_causal_attention(query, key, value, labels, channels, budget, cfg.sink, cfg.recent,
                                  kwargs.get("scaling"), cfg.group_reduce, allowed)
        self.count("sparse_score")
        return out.transpose(1, 2).contiguous(), None
