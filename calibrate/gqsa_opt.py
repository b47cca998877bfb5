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


def _block_error(layer: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, idx: torch.Tensor, kwargs_fn,
                 chunk: int) -> float:
    """Mean squared error of the block's outputs against `targets` over the samples `idx` (no grad)."""
    device = next(layer.parameters()).device
    tot, n = 0.0, 0
    # no_grad, not inference_mode: a layer (a patched attention) may keep a tensor made here and
    # use it in the next training step, which inference tensors forbid.
    with torch.no_grad():
        for j in range(0, len(idx), chunk):
            sel = idx[j:j + chunk]
            y = _layer_out(layer, inputs[sel].to(device), kwargs_fn(len(sel)))
            d = y.float() - targets[sel].to(device).float()
            tot += float(d.pow(2).sum())
            n += d.numel()
    return tot / max(n, 1)


def eval_indices(n: int, n_eval: int, seed: int) -> torch.Tensor:
    """The fixed samples (of n) that BQPO's block error is measured on: all of them when n_eval is
    0 or >= n, else a seeded choice of n_eval (a generator of its own: the training batches stay
    those of a run without evaluation)."""
    if n_eval <= 0 or n_eval >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))[:n_eval].sort().values


def bqpo_eval_every(n_eval: int, batch: int) -> int:
    """Steps between two block-error measurements when the caller does not say: one measurement
    (n_eval sample forwards) per ceil(n_eval / batch) steps (each a forward and a backward of
    `batch` samples, ~3 x batch sample forwards), so the guard costs at most about a third of
    the training it guards. Measuring after every step made stage 1 ~2x slower (8 samples
    measured per 2-sample step)."""
    return max(1, -(-n_eval // max(batch, 1)))


def eval_steps(steps: int, every: int) -> list[int]:
    """The steps after which BQPO measures the block error: 0 (the stage-1 start), every
    `every`-th step, and always the last one."""
    return sorted({0, steps, *range(every, steps + 1, every)}) if steps > 0 else [0]


def bqpo_block(layer: nn.Module, fq: dict[str, FakeQuantLinear], inputs: torch.Tensor,
               targets: torch.Tensor, kwargs_fn, steps: int, lr: float, batch: int,
               seed: int = 0, desc: str = "", eval_samples: int = 0, keep_best: bool = True,
               eval_every: int | None = None) -> tuple[float, float]:
    """Train the swapped-in FakeQuantLinears of `layer` (names relative to it) for `steps`.

    inputs/targets: [N, L, hidden]; kwargs_fn(b) gives the layer's kwargs for a batch of b.
    The block error (MSE to the dense block's outputs) is measured on one fixed set of samples
    (`eval_indices(N, eval_samples, seed)`) at the steps `eval_steps(steps, eval_every)`: before
    training, every eval_every steps and after the last (eval_every None: `bqpo_eval_every`).
    keep_best: the parameters end as a measured snapshot, the one of the lowest error (the
    stage-1 start included), so BQPO never returns a block worse on those samples than the one
    it was given (a too-large step can raise it: Adam on a few minibatches overshoots); steps
    between two measurements are never kept on their own. keep_best=False keeps the last step
    (the version-2 behaviour). Returns (block error before, block error of the kept
    parameters), on the same samples.
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
    ev = eval_indices(inputs.size(0), eval_samples, seed)
    every = bqpo_eval_every(len(ev), batch) if eval_every is None else int(eval_every)
    if every < 1:
        raise ValueError(f"bqpo_block: eval_every={eval_every} must be >= 1")
    # keep_best=False only needs the two ends (what it reports).
    at = set(eval_steps(steps, every) if keep_best else (0, steps))
    err = lambda: _block_error(layer, inputs, targets, ev, kwargs_fn, max(batch, 8))  # noqa: E731
    trained = params_w + params_q
    before = best = err()
    best_state, best_step = [p.detach().clone() for p in trained], 0
    last = before
    for step in range(steps):
        idx = torch.randperm(inputs.size(0), generator=g)[:batch]
        with torch.enable_grad():
            y = _layer_out(layer, inputs[idx].to(device), kwargs_fn(len(idx)))
            loss = F.mse_loss(y.float(), targets[idx].to(device).float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if step + 1 not in at:
            continue
        last = err()
        if keep_best and last < best:
            best, best_step = last, step + 1
            best_state = [p.detach().clone() for p in trained]
    if keep_best:
        with torch.no_grad():
            for p, v in zip(trained, best_state):
                p.copy_(v)
        kept = best
    else:
        kept = last
    what = (f"kept step {best_step}" + (" (the stage-1 start: no step improved it)" if best_step == 0 else "")
            if keep_best else "kept the last step")
    log.info("BQPO %s: %d steps, block MSE on %d fixed samples %.3e -> %.3e (last step %.3e; %s; measured after "
             "steps %s)", desc, steps, len(ev), before, kept, last, what, ",".join(map(str, sorted(at))))
    return before, kept


def _lm_loss(model: nn.Module, samples: torch.Tensor, batch: int, device) -> float:
    """Mean next-token loss of `model` over `samples` ([n, L]), token-weighted (no grad)."""
    tot, n = 0.0, 0
    with torch.no_grad():
        for j in range(0, samples.size(0), batch):
            ids = samples[j:j + batch].to(device)
            k = ids.numel() - ids.size(0)  # predicted tokens
            tot += float(model(input_ids=ids, labels=ids, use_cache=False).loss) * k
            n += k
    return tot / max(n, 1)


def split_holdout(samples: torch.Tensor, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(train, held-out) rows of `samples`: round(holdout * N) seeded rows held out, at least 1 when
    holdout > 0, never all (None when nothing can be held out)."""
    n = samples.size(0)
    k = min(n - 1, max(1, round(holdout * n))) if holdout > 0 else 0
    if k <= 0:
        return samples, None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 104729))
    return samples[perm[k:].sort().values], samples[perm[:k].sort().values]


def e2e_oqp(model: nn.Module, packed: dict[str, GQSAWeight], samples: torch.Tensor, steps: int,
            lr: float, batch: int, tile_rows: int, progress: bool = True, seed: int = 0, *,
            holdout: float = 0.125, eval_every: int = 16, patience: int = 2,
            record: dict | None = None) -> dict[str, GQSAWeight]:
    """Stage 2: train scales/zeros of every packed linear with the LM loss; codes stay frozen.

    packed: full linear name -> GQSAWeight (the model's linears hold its dequantized weights).
    samples: [N, L] token ids. Returns the re-packed weights (same codes, new scales/zeros).

    Overfitting guard (holdout > 0, the default: GQSAConfig's e2e_holdout): `split_holdout` keeps a seeded share of the samples out of
    training; their LM loss is measured before training, every `eval_every` steps and after the
    last; the scales/zeros of the lowest held-out loss are kept (the stage-1 ones when no step
    helps) and training stops after `patience` evaluations without a new best. Why: 128 steps on
    a few thousand calibration tokens fit that text (SmolLM2, 16 x 256: wiki ppl 145.9 -> 328.5).
    record: filled with what happened (held-out losses, the kept step, steps run).
    """
    if steps <= 0:
        return packed
    fqs, olds = {}, {}
    device = next(model.parameters()).device
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    train, held = split_holdout(samples, holdout, seed)
    if holdout > 0 and held is None:
        log.warning("E2E-OQP: %d calibration sample(s), none can be held out; training without the guard",
                    samples.size(0))
    for name, w in packed.items():
        lin = model.get_submodule(name)
        fqs[name] = FakeQuantLinear(lin, w.cols, w.group_size, w.bits, codes=w.codes(),
                                    scale=w.scales.float(), zero=w.zeros.float())
        olds[name] = _swap(model, name, fqs[name])
    rec = record if record is not None else {}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for m in fqs.values():
            m.scale.requires_grad_(True)
            m.zero.requires_grad_(True)
        params = [p for m in fqs.values() for p in (m.scale, m.zero)]
        opt = torch.optim.Adam([{"params": [m.scale for m in fqs.values()], "lr": lr},
                                {"params": [m.zero for m in fqs.values()], "lr": lr * 100}])
        g = torch.Generator().manual_seed(seed)
        best = best_state = None
        best_step, bad, losses = 0, 0, []
        if held is not None:
            best = _lm_loss(model, held, max(batch, 4), device)
            best_state = [p.detach().clone() for p in params]
            losses.append((0, best))
            log.info("E2E-OQP: %d training / %d held-out samples; held-out LM loss %.4f at the start",
                     train.size(0), held.size(0), best)
        bar = tqdm(range(steps), desc="E2E-OQP", disable=not progress)
        ran = 0
        for step in bar:
            ids = train[torch.randperm(train.size(0), generator=g)[:batch]].to(device)
            with torch.enable_grad():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            ran = step + 1
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.info("E2E-OQP step %d/%d: LM loss %.4f", step + 1, steps, loss.item())
            if held is not None and (ran % eval_every == 0 or ran == steps):
                h = _lm_loss(model, held, max(batch, 4), device)
                losses.append((ran, h))
                if h < best:
                    best, best_step, bad = h, ran, 0
                    best_state = [p.detach().clone() for p in params]
                else:
                    bad += 1
                log.info("E2E-OQP step %d: held-out LM loss %.4f (best %.4f at step %d)", ran, h, best, best_step)
                if bad >= patience:
                    log.info("E2E-OQP: stopping early at step %d: %d evaluations without a better held-out loss",
                             ran, bad)
                    break
        bar.close()
        if best_state is not None:
            with torch.no_grad():
                for p, v in zip(params, best_state):
                    p.copy_(v)
            log.info("E2E-OQP: kept the scales/zeros of step %d (held-out LM loss %.4f -> %.4f)",
                     best_step, losses[0][1], best)
        rec.update(steps_run=ran, kept_step=best_step if held is not None else ran,
                   heldout_samples=0 if held is None else held.size(0),
                   heldout_loss=[[s, round(v, 5)] for s, v in losses])
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
