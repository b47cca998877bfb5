"""Calibrating "prune" artifacts (Wanda / magnitude, optionally + DSnoT) and exporting them to HF.

The model walk lives here; the math is in `wanda.py` and `dsnot.py`. Wanda and DSnoT run through
the layer-sequential runner, one decoder layer at a time, and the pruned layer's outputs become
the next layer's inputs. By default a layer takes one joined pass (every linear is measured on
its input and pruned just before it runs); when that would need too much memory, two passes
(measure the dense layer, prune, recompute). See `_LayerPruner`.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from accel.artifact import Artifact, ArtifactError
from accel.configs import ConfigError
from accel.configs.prune import CALIB_MODES, PruneConfig
from accel.patches import compat
from accel.patches.prune import pack_mask, unpack_mask
from accel.patches.targets import iter_linears

from .dsnot import dsnot_refine, gram_fp32
from .runner import (CalibrationError, LayerData, RunStats, check_model, check_samples, joined_bytes,
                     linear_input_stats, run_layerwise)
from .wanda import magnitude_mask, wanda_mask

log = logging.getLogger(__name__)


@dataclass
class InputStats:
    """Per-input-channel statistics of one linear's calibration inputs (fp64 accumulators).

    xtx: optional [in, in] accumulator of X^T X (DSnoT's "mse" objective); None = not collected.
    sinks: the inputs at position 0 of each sample (DSnoT's sink guard), when collected."""

    total: torch.Tensor
    sq: torch.Tensor
    count: int = 0
    xtx: torch.Tensor | None = None
    sinks: list = field(default_factory=list)

    def add_sinks(self, x: torch.Tensor, tokens_per_sample: int) -> None:
        """x: [samples * tokens_per_sample, in], whole samples; keeps each sample's first token."""
        self.sinks.append(x.reshape(-1, tokens_per_sample, x.size(-1))[:, 0].float().clone())

    @property
    def sink_inputs(self) -> torch.Tensor | None:
        """[samples, in] (fp32) inputs at position 0, or None if not collected."""
        return torch.cat(self.sinks) if self.sinks else None

    def add(self, x: torch.Tensor) -> None:
        """x: [tokens, in]."""
        # Per-chunk sums in fp32, accumulated across chunks in fp64.
        self.total += x.sum(0).double()
        self.sq += x.pow(2).sum(0).double()
        if self.xtx is not None:
            self.xtx += gram_fp32(x).double()
        self.count += x.size(0)

    @classmethod
    def zeros(cls, n_in: int, gram: bool = False, device=None) -> "InputStats":
        """Empty accumulators for a linear with `n_in` inputs on `device` (the linear's: its inputs
        arrive there); gram: also accumulate X^T X."""
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(n_in), z(n_in), xtx=z(n_in, n_in) if gram else None)

    @property
    def gram(self) -> torch.Tensor | None:
        """E[x x^T] per token ([in, in], fp64), or None if X^T X was not collected."""
        return None if self.xtx is None else self.xtx / max(self.count, 1)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        # Population variance per token; fp64 keeps E[x^2] - E[x]^2 from cancelling badly.
        return (self.sq / max(self.count, 1) - self.mean.pow(2)).clamp_min(0)


@dataclass
class PruneInfo:
    """What a calibration did: masks per linear, runner stats and timings."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    run: RunStats | None = None
    seconds: float = 0.0
    dsnot_swaps: int = 0
    dsnot_seconds: float = 0.0   # in dsnot_refine (the prune-and-grow cycles), all layers
    mode: str | None = None      # "joined" or "two-pass" (None: no calibration data used)


def selected_linears(model, cfg: PruneConfig) -> list[tuple[str, nn.Linear]]:
    """The targeted linears; raises ConfigError if a pattern does not fit one of them."""
    linears = list(iter_linears(model, cfg.targets, cfg.ignore))
    if not linears:
        raise ConfigError("prune: no linear selected (targets/ignore exclude them all)")
    nm = cfg.nm
    if nm is not None:
        bad = [f"{n} (in_features={m.in_features})" for n, m in linears if m.in_features % nm[1]]
        if bad:
            raise ConfigError(f"prune: pattern {cfg.pattern} needs in_features divisible by {nm[1]}; not so for "
                              + ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""))
    return linears


def _mask_for(cfg: PruneConfig, lin: nn.Linear, st: InputStats | None, tokens_per_sample: int, info: PruneInfo,
              sink_guard: bool = False):
    w = lin.weight.detach()
    if cfg.init == "magnitude":
        keep = magnitude_mask(w, cfg.sparsity, cfg.nm)
    else:
        keep = wanda_mask(w, st.sq, cfg.sparsity, cfg.nm, cfg.use_variant)
    if cfg.dsnot:
        t0 = time.perf_counter()
        r = dsnot_refine(w, keep, st.mean, st.var, st.sq, tokens_per_sample, cfg.nm,
                         cfg.max_cycles, cfg.threshold, cfg.pow_var, cfg.dsnot_objective, st.gram,
                         guard=st.sink_inputs if sink_guard else None)
        keep = r.keep
        info.dsnot_swaps += int(r.swaps.sum())
        info.dsnot_seconds += time.perf_counter() - t0
    return keep


class _LayerPruner:
    """The runner's method. Two modes:

    - joined (one pass per layer): all calibration samples go through the layer as one batch; a
      pre-hook on each targeted linear measures its input, prunes it, and lets it run pruned, so
      later linears of the layer see the already-pruned earlier ones ("true sequential"). One
      layer forward per layer, but memory grows with the calibration tokens.
    - two-pass: statistics of every linear on the dense layer, prune them all, then a second pass
      computes the pruned layer's outputs (Wanda's official pipeline; memory bounded by a chunk).
    """

    def __init__(self, cfg: PruneConfig, by_layer: dict[int, list[tuple[str, nn.Linear]]],
                 tokens_per_sample: int, info: PruneInfo, joined: bool = False, sink_guard: bool = False):
        self.cfg, self.by_layer, self.tps, self.info, self.joined = cfg, by_layer, tokens_per_sample, info, joined
        # DSnoT's sink guard needs each sample's first-token inputs (see dsnot._SinkGuard).
        self.sink_guard = sink_guard and cfg.dsnot

    def process_layer(self, i: int, layer: nn.Module, data: LayerData) -> dict[str, torch.Tensor]:
        lins = dict(self.by_layer.get(i, []))
        if not lins:
            return {}
        out: dict[str, torch.Tensor] = {}
        t0, swaps0, ds0 = time.perf_counter(), self.info.dsnot_swaps, self.info.dsnot_seconds
        if self.joined:
            self._joined_pass(i, layer, data, lins, out)
        else:
            stats = self._shared_stats_pass(i, layer, data, lins)
            for name, lin in lins.items():
                self._prune(name, lin, stats[name], out)
        if self.cfg.dsnot:
            # Per layer: where DSnoT's time goes (the cycles vs the statistics + layer forward).
            log.info("DSnoT layer %d: %d linears, %d swaps, cycles %.1fs, statistics + forward %.1fs", i, len(lins),
                     self.info.dsnot_swaps - swaps0, self.info.dsnot_seconds - ds0,
                     time.perf_counter() - t0 - (self.info.dsnot_seconds - ds0))
        return out

    def _shared_stats_pass(self, i, layer, data: LayerData, lins: dict[str, nn.Linear]) -> dict[str, InputStats]:
        """Statistics of every linear's input on the dense layer (two-pass mode). Linears fed the
        same tensor (q/k/v, gate/up) share one InputStats, so X^T X is accumulated once per input."""
        stats: dict[str, InputStats] = {}
        # The last input seen and its stats; holding the tensor keeps its memory from being reused,
        # so an equal data_ptr/shape/stride means the very same input.
        last: list = [None, None]

        def add(name, x):
            prev = last[0]
            same = (prev is not None and x.data_ptr() == prev.data_ptr() and x.shape == prev.shape
                    and x.stride() == prev.stride() and x.dtype == prev.dtype)
            if same and stats.setdefault(name, last[1]) is last[1]:
                return
            st = stats.get(name)
            if st is None:
                st = stats[name] = InputStats.zeros(lins[name].in_features, self.cfg.needs_gram, lins[name].weight.device)
            st.add(x)
            if self.sink_guard:
                st.add_sinks(x, self.tps)
            last[0], last[1] = x, st
        # early_exit: the stats pass need not compute what comes after the last targeted input.
        linear_input_stats(layer, data, i, lins, add, early_exit=True)
        return stats

    def _joined_pass(self, i, layer, data: LayerData, lins: dict[str, nn.Linear], out) -> None:
        # q/k/v (and gate/up) receive the same tensor object: measure it once. Holding the
        # reference also keeps its memory from being reused by a later input of the same shape.
        last: list = [None, None]

        def make(name):
            def pre_hook(mod, args):
                x = args[0]
                if last[0] is not x:
                    st = InputStats.zeros(mod.in_features, self.cfg.needs_gram, mod.weight.device)
                    st.add(x.reshape(-1, x.size(-1)).float())
                    if self.sink_guard:
                        st.add_sinks(x.reshape(-1, x.size(-1)), self.tps)
                    last[0], last[1] = x, st
                self._prune(name, mod, last[1], out)
            return pre_hook
        data.forward_joined(layer, i, {m: make(n) for n, m in lins.items()})
        if len(out) != len(lins):
            missing = sorted(set(lins) - set(out))
            raise CalibrationError(f"layer {i}: {missing[0]} never ran in the layer's forward; cannot prune it")

    def _prune(self, name: str, lin: nn.Linear, st: InputStats, out: dict) -> None:
        if not (torch.isfinite(st.sq).all() and torch.isfinite(st.total).all()):
            raise CalibrationError(f"NaN/inf calibration activations at the input of {name}")
        keep = _mask_for(self.cfg, lin, st, self.tps, self.info, self.sink_guard)
        self._apply(name, lin, keep)
        out[name] = pack_mask(keep)

    def restore_layer(self, i: int, layer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        # Decode every mask before changing any weight: a bad checkpoint leaves the layer intact
        # for the runner to recompute.
        keeps = {}
        for name, lin in self.by_layer.get(i, []):
            if name not in tensors:
                raise CalibrationError(f"checkpoint of layer {i} lacks the mask of {name}")
            try:
                keeps[name] = (lin, unpack_mask(tensors[name], tuple(lin.weight.shape)))
            except ArtifactError as e:
                raise CalibrationError(f"checkpoint of layer {i}: {name}: {e}") from None
        for name, (lin, keep) in keeps.items():
            self._apply(name, lin, keep)

    def _apply(self, name: str, lin: nn.Linear, keep: torch.Tensor) -> None:
        with torch.no_grad():
            lin.weight.mul_(keep.to(lin.weight.device, lin.weight.dtype))
        self.info.masks[name] = keep


def joined_fits(model, samples: torch.Tensor, max_bytes: int | None = None) -> bool:
    """Whether a joined pass over `samples` fits in `max_bytes` (default: a quarter of the RAM)."""
    if max_bytes is None:
        try:
            max_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
        except (ValueError, OSError, AttributeError):
            max_bytes = 4 << 30
    return joined_bytes(model, samples.numel()) <= max_bytes


def _group_by_layer(model, linears) -> dict[int, list[tuple[str, nn.Linear]]]:
    prefix = compat.SUPPORTED_MODEL_TYPES[compat.text_config(model.config).model_type] + "."
    out: dict[int, list] = {}
    for name, lin in linears:
        if not name.startswith(prefix):
            raise ConfigError(f"prune: {name} is not inside a decoder layer; only decoder linears can be pruned")
        idx = int(name[len(prefix):].split(".", 1)[0])
        out.setdefault(idx, []).append((name, lin))
    return out


def prune_model(model, cfg: PruneConfig, samples: torch.Tensor | None = None, *, batch_size: int = 8,
                checkpoint_dir: str | os.PathLike | None = None, progress: bool = True,
                stop_after: int | None = None, mode: str = "auto", dsnot_sink_guard: bool | None = None) -> PruneInfo:
    """Prune `model` in place; returns the keep-masks. samples: [N, L] token ids (needed unless the
    config is plain magnitude). Validates everything before touching the model.

    mode: "joined" (one layer forward per layer, memory grows with the calibration tokens),
    "two-pass" (statistics pass + output pass, memory bounded by one chunk), or "auto" (joined
    when `joined_fits`).

    dsnot_sink_guard: overrides `cfg.dsnot_sink_guard` (DSnoT may not raise any row's error on the
    first token of each sample, the attention sink; see dsnot._SinkGuard) when not None."""
    if mode not in CALIB_MODES:
        raise ConfigError(f"prune: mode must be one of {CALIB_MODES}, got {mode!r}")
    check_model(model, [])
    linears = selected_linears(model, cfg)
    # A NaN weight would give NaN scores and an artifact whose model computes NaN everywhere.
    check_model(model, linears)
    if cfg.needs_data:
        if samples is None:
            raise CalibrationError(f"{cfg.label} needs calibration samples [N >= 1, L >= 2], got None")
        check_samples(model, samples, min_len=2)
    info = PruneInfo()
    t0 = time.perf_counter()
    if not cfg.needs_data:
        for name, lin in linears:
            keep = magnitude_mask(lin.weight, cfg.sparsity, cfg.nm)
            with torch.no_grad():
                lin.weight.mul_(keep.to(lin.weight.dtype))
            info.masks[name] = keep
        info.seconds = time.perf_counter() - t0
        return info
    joined = mode == "joined" or (mode == "auto" and joined_fits(model, samples))
    info.mode = "joined" if joined else "two-pass"
    guard = cfg.dsnot_sink_guard if dsnot_sink_guard is None else bool(dsnot_sink_guard)
    method = _LayerPruner(cfg, _group_by_layer(model, linears), samples.size(1), info, joined=joined,
                          sink_guard=guard)
    # The runner adds the model, the data and the accel version to this key; the guard as run
    # (an override differs from the config's).
    key = {"method": "prune", "config": {**cfg.to_dict(), "dsnot_sink_guard": method.sink_guard},
           "batch_size": batch_size, "mode": info.mode}
    info.run = run_layerwise(model, samples, method, batch_size=batch_size, checkpoint_dir=checkpoint_dir,
                             run_key=key, progress=progress, desc=cfg.label, stop_after=stop_after)
    info.seconds = time.perf_counter() - t0
    return info


def time_forward(model, samples: torch.Tensor, batch_size: int = 8) -> float:
    """Seconds for one plain forward pass of `model` over `samples` ([N, L]), the ratio's unit."""
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, samples.size(0), batch_size):
            model(input_ids=samples[s:s + batch_size].to(device), use_cache=False)
    return time.perf_counter() - t0


def build_artifact(model, cfg: PruneConfig, info: PruneInfo, calibration: dict) -> Artifact:
    return Artifact.for_model(model, cfg, tensors={f"prune/{n}": pack_mask(k) for n, k in info.masks.items()},
                              calibration=calibration)


# ---------------------------------------------------------------------------------------------
# Export to a plain (dense) HF checkpoint: `accel export --format hf-dense`
# ---------------------------------------------------------------------------------------------
def load_source(source: str | None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer or None) for the model name an artifact records."""
    from accel.hf_checkpoint import _load_source

    if not source:
        raise ArtifactError("this artifact does not record its base model (calibration.model); pass the model")
    return _load_source(source, dtype)


def export_hf(artifact: str | os.PathLike | Artifact, output: str | os.PathLike, model=None, tokenizer=None, *,
              overwrite: bool = False) -> Path:
    """Write `output` as a plain, dense HF checkpoint of the base model with the artifact's masks
    applied to its weights (`--format hf-dense`, for tools that do not know accel; `--format hf`
    is the accel checkpoint, accel/hf_checkpoint.py). Written into a temp dir and renamed, so a
    failure leaves nothing behind.

    model: the base model, loaded or as a name/path for `accel.models.load`. When None, the model
    the artifact records is used only if accel ships it (smollm2-135m, tiny-*): an artifact never
    makes accel load a hub name or local path of its choosing. Either way the model must match
    the artifact's fingerprint. output: must not exist, be empty, or be an accel hf export
    (replaced only with overwrite=True); see accel.artifact.check_output_path."""
    import json

    from accel.artifact import (HF_EXPORT_FORMAT, HF_EXPORT_MARKER, check_output_path, make_output_tmpdir,
                                move_into_place)
    from accel.hf_checkpoint import base_model_for

    output = check_output_path(output, overwrite, "hf")
    art = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
    cfgs = [c for c in art.configs if isinstance(c, PruneConfig)]
    if len(cfgs) != 1 or len(art.configs) != 1:
        raise ArtifactError("export --format hf-dense handles artifacts holding exactly one 'prune' config, got "
                            + ", ".join(c.method for c in art.configs) + " (--format hf writes any methods)")
    cfg = cfgs[0]
    model, tokenizer = base_model_for(art, model, tokenizer)
    tensors = art.tensors_for("prune")
    linears = list(iter_linears(model, cfg.targets, cfg.ignore))
    missing = [n for n, _ in linears if n not in tensors]
    if missing:
        raise ArtifactError(f"artifact has no mask for {missing[0]}")
    with torch.no_grad():
        for name, lin in linears:
            lin.weight.mul_(unpack_mask(tensors[name], tuple(lin.weight.shape)).to(lin.weight.dtype))
    tmp = make_output_tmpdir(output)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # The manifest lets a later --overwrite tell this export from a user's directory.
        names = sorted(p.name for p in tmp.iterdir())
        (tmp / HF_EXPORT_MARKER).write_text(json.dumps({"format": HF_EXPORT_FORMAT, "files": names}))
        move_into_place(tmp, output, overwrite, "hf")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s pruned linears to %s", len(linears), output)
    return output
