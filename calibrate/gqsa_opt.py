"""The GQSA optimisation math: fake-quantized group-sparse linears, BQPO and E2E-OQP.

BQPO (stage 1): per decoder block, with the kept groups fixed, train the kept weights and their
scales/zeros so the block's output matches the dense block's output (MSE), rounding through a
straight-through estimator. E2E-OQP (stage 2): freeze the integer codes; train only scales and
zeros of every layer with the LM loss.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from accel.kernels.gqsa_linear.format import (GQSAWeight, from_codes, gather_groups, minmax_params,
                                              quantize_codes)

log = logging.getLogger(__name__)

_MIN_SCALE = 2.0 ** -20


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def _scatter_dense(groups: torch.Tensor, cols: torch.Tensor, in_features: int) -> torch.Tensor:
    """groups: [out, k, g] at group columns cols: [out, k] -> dense [out, in] (pruned = 0)."""
    out, k, g = groups.shape
    idx = cols[:, :, None].expand(-1, -1, g)
    return groups.new_zeros(out, in_features // g, g).scatter(1, idx, groups).view(out, in_features)


class FakeQuantLinear(nn.Module):
    """Trainable stand-in for one target linear during BQPO / E2E-OQP. x: [..., in] -> [..., out].

    With `codes` given, the integer codes are frozen (stage 2) and only scale/zero train.
    Without codes, `init_weight` ([out, in], default linear.weight) and scale/zero (default min/max
    of each kept group) give the starting point of the trainable weights and grid.
    """

    def __init__(self, linear: nn.Linear, cols: torch.Tensor, group_size: int, bits: int,
                 codes: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                 zero: torch.Tensor | None = None, init_weight: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size, self.bits, self.qmax = group_size, bits, 2 ** bits - 1
        self.register_buffer("cols", cols.long())
        self.bias = None if linear.bias is None else linear.bias.detach()
        if codes is None:
            w0 = linear.weight if init_weight is None else init_weight
            wg = gather_groups(w0.detach().float(), self.cols, group_size)
            s, z = minmax_params(wg, bits) if scale is None else (scale.float(), zero.float())
            self.weight = nn.Parameter(wg.clone())
            self.codes = None
        else:
            self.weight = None
            self.register_buffer("codes", codes.float())
            s, z = scale.float(), zero.float()
        self.scale = nn.Parameter(s.clone())
        self.zero = nn.Parameter(z.clone())

    def groups(self) -> torch.Tensor:
        s = self.scale.clamp(min=_MIN_SCALE)[..., None]
        z = self.zero[..., None]
        q = self.codes if self.codes is not None else torch.clamp(_round_ste(self.weight / s + z), 0, self.qmax)
        return (q - z) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _scatter_dense(self.groups(), self.cols, self.in_features).to(x.dtype)
        return F.linear(x, w, self.bias)

    @torch.no_grad()
    def export(self, tile_rows: int) -> GQSAWeight:
        """Pack: scale/zero rounded to fp16 storage first, then codes against the stored values."""
        s = self.scale.clamp(min=_MIN_SCALE).half().float()
        z = self.zero.clamp(0, self.qmax).half().float()
        q = self.codes if self.codes is not None else quantize_codes(self.weight, s, z, self.bits)
        return from_codes(q, self.cols, s, z, self.in_features, self.group_size, self.bits, tile_rows)


def _swap(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def _layer_out(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    y = layer(x, **kwargs)
    return y[0] if isinstance(y, (tuple, list)) else y


def bqpo_block(layer: nn.Module, fq: dict[str, FakeQuantLinear], inputs: torch.Tensor,
               targets: torch.Tensor, kwargs_fn, steps: int, lr: float, batch: int,
               seed: int = 0, desc: str = "") -> tuple[float, float]:
    """Train the swapped-in FakeQuantLinears of `layer` (names relative to it) for `steps`.

    inputs/targets: [N, L, hidden]; kwargs_fn(b) gives the layer's kwargs for a batch of b.
    Returns (first minibatch MSE, last minibatch MSE).
    """
    params_w = [m.weight for m in fq.values() if m.weight is not None]
    params_q = [p for m in fq.values() for p in (m.scale, m.zero)]
    # Zero points live in code units (0..qmax), scales and weights in weight units: the zero
    # gets a larger step so that both move a similar fraction of a quantization step.
    opt = torch.optim.Adam([{"params": params_w, "lr": lr}, {"params": [m.scale for m in fq.values()], "lr": lr * 0.1},
                            {"params": [m.zero for m in fq.values()], "lr": lr * 100}])
    for p in layer.parameters():
        p.requires_grad_(False)
    for p in params_w + params_q:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    # The runner keeps activations on the CPU; the layer may live on an accelerator.
    device = next(layer.parameters()).device
    first = last = float("nan")
    for step in range(steps):
        idx = torch.randperm(inputs.size(0), generator=g)[:batch]
        with torch.enable_grad():
            y = _layer_out(layer, inputs[idx].to(device), kwargs_fn(len(idx)))
            loss = F.mse_loss(y.float(), targets[idx].to(device).float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        last = loss.item()
        if step == 0:
            first = last
    log.info("BQPO %s: %d steps, minibatch MSE %.3e -> %.3e", desc, steps, first, last)
    return first, last


def e2e_oqp(model: nn.Module, packed: dict[str, GQSAWeight], samples: torch.Tensor, steps: int,
            lr: float, batch: int, tile_rows: int, progress: bool = True, seed: int = 0) -> dict[str, GQSAWeight]:
    """Stage 2: train scales/zeros of every packed linear with the LM loss; codes stay frozen.

    packed: full linear name -> GQSAWeight (the model's linears hold its dequantized weights).
    samples: [N, L] token ids. Returns the re-packed weights (same codes, new scales/zeros).
    """
    if steps <= 0:
        return packed
    fqs, olds = {}, {}
    device = next(model.parameters()).device
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    for name, w in packed.items():
        lin = model.get_submodule(name)
        fqs[name] = FakeQuantLinear(lin, w.cols, w.group_size, w.bits, codes=w.codes(),
                                    scale=w.scales.float(), zero=w.zeros.float())
        olds[name] = _swap(model, name, fqs[name])
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for m in fqs.values():
            m.scale.requires_grad_(True)
            m.zero.requires_grad_(True)
        opt = torch.optim.Adam([{"params": [m.scale for m in fqs.values()], "lr": lr},
                                {"params": [m.zero for m in fqs.values()], "lr": lr * 100}])
        g = torch.Generator().manual_seed(seed)
        bar = tqdm(range(steps), desc="E2E-OQP", disable=not progress)
        for step in bar:
            ids = samples[torch.randperm(samples.size(0), generator=g)[:batch]].to(device)
            with torch.enable_grad():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.info("E2E-OQP step %d/%d: LM loss %.4f", step + 1, steps, loss.item())
        out = {name: fqs[name].export(tile_rows) for name in packed}
    finally:
        for name, old in olds.items():
            _swap(model, name, old)
        for n, p in model.named_parameters():
            p.requires_grad_(req[n])
    with torch.no_grad():
        for name, w in out.items():
            lin = model.get_submodule(name)
            lin.weight.copy_(w.dequantize().to(lin.weight.dtype))
    return out
