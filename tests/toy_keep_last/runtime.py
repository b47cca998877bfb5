"""(3) The applier of keep-last: every full-attention layer gets a KeepLastAttention handler (on
accel's KV-press base); sliding-window layers (Gemma3's local ones) stay dense."""
from __future__ import annotations

import torch

from accel.artifact import ArtifactError
from accel.kernels.dispatch import select_path
from accel.patches import register_method
from accel.patches.kv_press import PressHandler, allowed_from_mask, install_press, is_sliding_layer, model_dims

from .kernel import keep_last_attention


class KeepLastAttention(PressHandler):
    """One layer's handler: dense (SDPA, bit-identical) while the context fits in n tokens."""

    def __init__(self, cfg, layer_idx: int, device):
        super().__init__(layer_idx)
        self.cfg, self.path = cfg, select_path(device)
        self.kernel_path = f"keep-last-{'cpu' if self.path == 'triton' else self.path}"
        self.counts["pressed"] = 0

    def _attend(self, module, query, key, value, attention_mask, **kwargs):
        B, _, Tq, _ = query.shape
        Tk = key.shape[2]
        if Tk <= self.cfg.n:
            return self.dense(module, query, key, value, attention_mask, **kwargs)
        allowed = None if attention_mask is None else allowed_from_mask(attention_mask, B, Tq, Tk, query.device)
        out = keep_last_attention(query, key, value, self.cfg.n, self.cfg.sink, kwargs.get("scaling"), allowed,
                                  path=self.path)
        self.counts["pressed"] += 1
        return out.transpose(1, 2).contiguous(), None

    def with_cache(self, module, query, key, value, attention_mask, layer, **kwargs):
        return self._attend(module, query, key, value, attention_mask, **kwargs)

    def without_cache(self, module, query, key, value, attention_mask, **kwargs):
        return self._attend(module, query, key, value, attention_mask, **kwargs)


@register_method("keep-last", claims=("attention",))
def apply_keep_last(ctx, cfg, tensors: dict) -> None:
    model = ctx.model
    d = model_dims(model)
    if "dims" in tensors:
        want = torch.tensor([d["layers"], d["kv_heads"], d["head_dim"]])
        got = tensors["dims"]
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or not torch.equal(got.long(), want):
            raise ArtifactError(f"keep-last: the artifact's dims {got.tolist() if isinstance(got, torch.Tensor) else got}"
                                f" are not this model's [layers, kv_heads, head_dim] = {want.tolist()}")
    device = next(model.parameters()).device
    install_press(ctx, lambda i, attn: KeepLastAttention(cfg, i, device),
                  skip=lambda i, attn: "sliding" if is_sliding_layer(model, i, attn) else None,
                  detail=f"n={cfg.n} sink={cfg.sink}")
