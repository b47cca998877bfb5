"""GQSA calibration: the model walk (layer-sequential runner) around the math in gqsa_opt.

    art = accel.calibrate(model, GQSAConfig(bits=4, sparsity=0.5, group_size=16), output="out/gqsa",
                          tokenizer=tok)      # the model is left unchanged
"""
from __future__ import annotations

import dataclasses
import logging
import time

import torch
from torch import nn

from accel.artifact import Artifact, fingerprint
from accel.configs import ConfigError
from accel.configs.gqsa import GQSAConfig
from accel.data import CalibrationSpec, calibration_samples
from accel.kernels.gqsa_linear.format import GQSAWeight, group_scores, n_keep_for, pack_weight, select_groups
from accel.patches import compat
from accel.patches.gqsa_embedding import pack_embeddings
from accel.patches.targets import iter_linears

from .gqsa_obs import obs_group_prune_quant
from .gqsa_opt import FakeQuantLinear, _swap, bqpo_block, e2e_oqp
from .owl import outlier_ratios, owl_sparsities
from .registry import default_spec, preserved_weights, register_calibrator
from .runner import CalibrationError, LayerData, check_model, check_samples, check_seq_len, run_layerwise

log = logging.getLogger(__name__)


def target_linears(model, cfg: GQSAConfig) -> dict[str, nn.Linear]:
    """Full name -> linear for every target; checks the group size against each in_features."""
    lins = dict(iter_linears(model, cfg.targets, cfg.ignore))
    for name, lin in lins.items():
        cfg.check_linear(name, lin.in_features)
    return lins


class GQSALayerMethod:
    """Runner method: per decoder layer, mask + grid (OBS/GPTQ, or Wanda scores + RTN) -> BQPO -> pack."""

    def __init__(self, model, cfg: GQSAConfig, seed: int = 0, layer_sparsity: dict[int, float] | None = None):
        self.cfg, self.seed = cfg, seed
        # Per-layer sparsity (OWL allocation); layers not listed use cfg.sparsity.
        self.layer_sparsity = dict(layer_sparsity or {})
        self.prefix = compat.SUPPORTED_MODEL_TYPES[compat.text_config(model.config).model_type]
        self.lins = target_linears(model, cfg)
        self.packed: dict[str, GQSAWeight] = {}
        self.mse: dict[int, tuple[float, float]] = {}

    def _names(self, i: int) -> dict[str, str]:
        """Full name -> name relative to decoder layer i, for the targets inside it."""
        p = f"{self.prefix}.{i}."
        return {n: n[len(p):] for n in self.lins if n.startswith(p)}

    def process_layer(self, i: int, layer: nn.Module, data: LayerData) -> dict[str, torch.Tensor]:
        cfg, names = self.cfg, self._names(i)
        if not names:
            return {}
        inputs = data.hidden
        if i in self.layer_sparsity:
            cfg = dataclasses.replace(cfg, sparsity=self.layer_sparsity[i], allocation="uniform")  # this layer's share
        if cfg.init == "obs":
            targets, fq = self._init_obs(cfg, i, layer, data, names)
        else:
            targets, fq = self._init_rtn(cfg, i, layer, data, names)
        olds = {rel: _swap(layer, rel, m) for rel, m in fq.items()}
        try:
            if cfg.bqpo_steps > 0:
                inputs, tgt = torch.cat(inputs), torch.cat(targets)
                device = next(layer.parameters()).device
                self.mse[i] = bqpo_block(layer, fq, inputs, tgt, lambda b: data.kwargs_for(i, b, device),
                                         cfg.bqpo_steps, cfg.bqpo_lr, cfg.bqpo_batch, self.seed + i, f"layer {i}",
                                         eval_samples=cfg.bqpo_eval_samples, keep_best=cfg.bqpo_keep_best)
            packed = {rel: m.export(cfg.tile_rows) for rel, m in fq.items()}
        finally:
            for rel, old in olds.items():
                _swap(layer, rel, old)
        out = {}
        for full, rel in names.items():
            self._install(layer.get_submodule(rel), packed[rel])
            self.packed[full] = packed[rel]
            out.update(packed[rel].to_tensors(rel))
        return out

    def _init_rtn(self, cfg, i, layer, data: LayerData, names):
        """Wanda group scores on the dense block's inputs, min/max grid (version-1 behaviour)."""
        sq = {}

        def make(rel):
            def hook(mod, inputs, output):
                x = inputs[0].reshape(-1, inputs[0].size(-1)).float()
                sq[rel] = sq.get(rel, 0) + x.pow(2).sum(0)
            return hook
        # One pass gives both the dense block outputs (BQPO targets) and each linear's ||X_j||.
        targets = data.forward(layer, i, hooks={layer.get_submodule(r): make(r) for r in names.values()})
        fq = {}
        for rel in names.values():
            if not torch.isfinite(sq[rel]).all():
                raise CalibrationError(f"layer {i}: NaN/inf calibration statistics (sum of x^2) at the input of {rel}")
            lin = layer.get_submodule(rel)
            cols = select_groups(group_scores(lin.weight, sq[rel].sqrt(), cfg.group_size), cfg.sparsity, cfg.tile_rows)
            fq[rel] = FakeQuantLinear(lin, cols, cfg.group_size, cfg.bits)
        return targets, fq

    def _init_obs(self, cfg, i, layer, data: LayerData, names):
        """OBS group pruning + GPTQ rounding, sequential inside the block: each linear's Gram matrix
        comes from inputs that already pass through the earlier, compressed linears of the block."""
        fq, last = {}, [None, None]
        targets = data.forward(layer, i)

        def make(rel):
            def pre_hook(mod, args):
                x = args[0]
                # q/k/v (gate/up) share one input tensor: one Gram matrix for all of them.
                if last[0] is not x:
                    xf = x.reshape(-1, x.size(-1)).float()
                    last[0], last[1] = x, xf.T @ xf
                    if not torch.isfinite(last[1]).all():
                        raise CalibrationError(f"layer {i}: NaN/inf calibration statistics (X^T X) at the input "
                                               f"of {rel}")
                wq, cols, s, z = obs_group_prune_quant(mod.weight, last[1], cfg.group_size, cfg.bits,
                                                       cfg.sparsity, cfg.tile_rows)
                fq[rel] = FakeQuantLinear(mod, cols, cfg.group_size, cfg.bits, scale=s, zero=z, init_weight=wq)
                mod.weight.copy_(wq.to(mod.weight.dtype))
            return pre_hook
        inputs = data.hidden
        data.forward_joined(layer, i, {layer.get_submodule(r): make(r) for r in names.values()})
        missing = sorted(set(names.values()) - set(fq))
        if missing:
            raise CalibrationError(f"layer {i}: {missing[0]} never ran in the layer's forward; cannot compress it")
        # BQPO and packing change the weights again: let the runner recompute this layer's outputs.
        data.hidden, data.advanced = inputs, None
        return targets, fq

    def restore_layer(self, i: int, layer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        # Decode every weight before installing any: a bad checkpoint leaves the layer intact.
        ws = {}
        for full, rel in self._names(i).items():
            try:
                ws[full] = (rel, GQSAWeight.from_tensors(tensors, rel))
            except Exception as e:  # KeyError, GQSAFormatError...: the checkpoint does not fit
                raise CalibrationError(f"checkpoint of layer {i}: {rel}: {type(e).__name__}: {e}") from None
            lin = layer.get_submodule(rel)
            w = ws[full][1]
            if (w.out_features, w.in_features) != tuple(lin.weight.shape):
                raise CalibrationError(f"checkpoint of layer {i}: {rel} has shape {(w.out_features, w.in_features)}, "
                                       f"the model's {tuple(lin.weight.shape)}")
        for full, (rel, w) in ws.items():
            self._install(layer.get_submodule(rel), w)
            self.packed[full] = w

    @staticmethod
    def _install(lin: nn.Linear, w: GQSAWeight) -> None:
        with torch.no_grad():
            lin.weight.copy_(w.dequantize().to(lin.weight.dtype))


def _model_sparsity(packed: dict[str, GQSAWeight]) -> float:
    """Fraction of pruned weights over all packed linears (what the allocation achieved)."""
    kept = sum(w.out_features * w.n_keep * w.group_size for w in packed.values())
    total = sum(w.out_features * w.in_features for w in packed.values())
    return 1.0 - kept / max(total, 1)


def check_reachable(lins: dict[str, nn.Linear], cfg: GQSAConfig, prefix: str,
                    layer_sparsity: dict[int, float] | None = None) -> float:
    """The model sparsity `cfg` will reach on `lins` (fraction of weights pruned), from whole
    groups per row. ConfigError where a request cannot be met because every row keeps at least
    one group (e.g. sparsity 0.99 with 4 groups per row stops at 0.75); a warning where rounding
    to whole groups moves the result more than 0.01 away from the request."""
    layer_sparsity = layer_sparsity or {}
    kept = total = 0
    for name, lin in lins.items():
        layer = int(name[len(prefix) + 1:].split(".", 1)[0]) if name.startswith(prefix + ".") else None
        s = layer_sparsity.get(layer, cfg.sparsity)
        n_groups = lin.in_features // cfg.group_size
        if n_groups - int(round(s * n_groups)) < 1:
            raise ConfigError(
                f"gqsa: sparsity={s:.4g} is not reachable for {name}: each row keeps at least one of its "
                f"{n_groups} groups of {cfg.group_size}, so it stops at {1 - 1 / n_groups:.4f}; lower the "
                f"sparsity (or the group_size, or owl_lambda)")
        kept += lin.out_features * n_keep_for(n_groups, s) * cfg.group_size
        total += lin.out_features * lin.in_features
    reach = 1.0 - kept / max(total, 1)
    if abs(reach - cfg.sparsity) > 0.01:
        log.warning("gqsa: sparsity=%.4f becomes %.4f: every row prunes a whole number of groups of %d",
                    cfg.sparsity, reach, cfg.group_size)
    return reach


def _check(model, cfg: GQSAConfig):
    """Everything that can be checked without data: the model, the targets, the group sizes and
    the reachable sparsity. Returns (target linears, decoder-layer prefix)."""
    check_model(model, [])
    lins = target_linears(model, cfg)
    if not lins:
        raise ConfigError("gqsa: no target linears selected")
    check_model(model, list(lins.items()))
    prefix = compat.SUPPORTED_MODEL_TYPES[compat.text_config(model.config).model_type]
    check_reachable(lins, cfg, prefix)
    return lins, prefix


@register_calibrator("gqsa", check=lambda model, cfg: _check(model, cfg) and None)
def calibrate_gqsa_model(model, config: GQSAConfig, samples: torch.Tensor, *, spec: CalibrationSpec,
                         checkpoint_dir=None, progress: bool = True) -> Artifact:
    """registry.py's calling shape: stage 1 (+ stage 2 when config.e2e_steps > 0). The method works
    layer by layer on the model itself (each layer's compressed outputs feed the next), so the
    targeted weights are copied to the CPU first and restored afterwards, also on error: the model
    is left unchanged at the cost of one host copy of its linear weights."""
    lins, prefix = _check(model, config)
    with preserved_weights(lins.items()):
        tensors, calib = _run(model, config, samples, spec, lins, prefix, checkpoint_dir, progress)
    return Artifact.for_model(model, [config], tensors, calibration=calib)


def calibrate_gqsa(model, tok, cfg: GQSAConfig, spec: CalibrationSpec | None = None, *,
                   checkpoint_dir=None, progress: bool = True, samples: torch.Tensor | None = None,
                   keep_changes: bool = False) -> Artifact:
    """Kept for existing callers; `accel.calibrate(model, cfg, ...)` is the entry.

    spec: default registry.default_spec("gqsa"). samples: [N, L] token ids to use instead of
    drawing them from `spec`. The model is left unchanged unless keep_changes=True (sweeps that
    evaluate the calibrated model): then it ends up holding the dequantized GQSA weights."""
    lins, prefix = _check(model, cfg)
    if spec is None:
        spec = default_spec("gqsa")
        if isinstance(samples, torch.Tensor) and samples.dim() == 2:
            spec = CalibrationSpec(source="given", n_samples=samples.size(0), seq_len=samples.size(1), seed=spec.seed)
    if samples is None:
        check_seq_len(model, spec.seq_len)
        samples = calibration_samples(tok, spec)
    if not keep_changes:
        return calibrate_gqsa_model(model, cfg, samples, spec=spec, checkpoint_dir=checkpoint_dir, progress=progress)
    fp = fingerprint(model)
    tensors, calib = _run(model, cfg, samples, spec, lins, prefix, checkpoint_dir, progress)
    art = Artifact.for_model(model, [cfg], tensors, calibration=calib)
    art.fingerprint = fp
    return art


def _run(model, cfg: GQSAConfig, samples, spec, lins, prefix, checkpoint_dir, progress):
    """Calibrate in place (the model ends up holding the dequantized GQSA weights); returns the
    artifact's (tensors, calibration record)."""
    t0 = time.perf_counter()
    check_samples(model, samples)
    layer_sparsity = None
    if cfg.allocation == "owl" and cfg.sparsity > 0:
        ratios = outlier_ratios(model, samples, lins, prefix, cfg.owl_m, progress=progress)
        layer_sparsity = owl_sparsities(ratios, cfg.sparsity, cfg.owl_lambda)
        log.info("OWL layer sparsities: %s", ", ".join(f"{i}:{v:.3f}" for i, v in layer_sparsity.items()))
        check_reachable(lins, cfg, prefix, layer_sparsity)
    method = GQSALayerMethod(model, cfg, seed=spec.seed, layer_sparsity=layer_sparsity)
    run_key = {"method": "gqsa", "config": cfg.to_dict(), "calibration": spec.to_dict()}
    stats = run_layerwise(model, samples, method, checkpoint_dir=checkpoint_dir, run_key=run_key,
                          progress=progress, desc="GQSA stage 1 (BQPO)")
    t1 = time.perf_counter()
    e2e = {}
    packed = e2e_oqp(model, method.packed, samples, cfg.e2e_steps, cfg.e2e_lr, cfg.e2e_batch,
                     cfg.tile_rows, progress=progress, seed=spec.seed, holdout=cfg.e2e_holdout,
                     eval_every=cfg.e2e_eval_every, patience=cfg.e2e_patience, record=e2e)
    tensors = {}
    for name, w in packed.items():
        tensors.update({f"gqsa/{k}": v for k, v in w.to_tensors(name).items()})
    # embedding_bits: the embedding / lm_head are packed by round to nearest per group (no data).
    tensors.update(pack_embeddings(model, cfg))
    calib = {**spec.to_dict(), "stage1_seconds": round(t1 - t0, 1),
             "stage2_seconds": round(time.perf_counter() - t1, 1), "resumed_layers": stats.resumed_layers,
             # Per layer: (block MSE before BQPO, of the kept parameters), on the same fixed samples.
             "bqpo_mse": {str(k): list(v) for k, v in method.mse.items()},
             "e2e": e2e,
             "layer_sparsity": {str(k): round(v, 4) for k, v in (layer_sparsity or {}).items()},
             "sparsity_requested": cfg.sparsity, "model_sparsity": round(_model_sparsity(packed), 4)}
    return tensors, calib


def rtn_artifact(model, cfg: GQSAConfig) -> Artifact:
    """An artifact of `cfg`'s layout without calibration data: magnitude group scores and
    round-to-nearest on every target. For speed measurements and kernel checks, not accuracy."""
    tensors = {}
    for name, lin in target_linears(model, cfg).items():
        w = pack_weight(lin.weight, sparsity=cfg.sparsity, group_size=cfg.group_size, bits=cfg.bits,
                        tile_rows=cfg.tile_rows)
        tensors.update({f"gqsa/{k}": v for k, v in w.to_tensors(name).items()})
    tensors.update(pack_embeddings(model, cfg))
    return Artifact.for_model(model, [cfg], tensors)
