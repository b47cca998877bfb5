"""Layer-sequential calibration runner, shared by the weight methods (Wanda, DSnoT, GQSA, R-Sparse).

    data = capture_inputs(model, samples)         # decoder-layer-0 inputs of every sample, on CPU
    for each decoder layer i:
        tensors = method.process_layer(i, layer, data)   # statistics from the *current* layer,
                                                         # then change it (prune / quantize)
        data.advance(layer, i)                           # its new outputs feed layer i+1

Activations stay on CPU between layers; only one layer's work runs at a time. The per-layer
results a method returns are checkpointed under `checkpoint_dir`, so an interrupted run resumes:
finished layers are restored from their checkpoint (`method.restore_layer`) and re-run forward,
which reproduces exactly the inputs an uninterrupted run would have seen. Checkpoints are keyed
by the model, the calibration data, the settings and the accel version (see `checkpoint.py`).

Every entry point checks its inputs first (`check_model`, `check_samples`): an unsupported
architecture, a non-finite weight or bad token ids fail before anything runs or is written.
"""
from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from accel.patches import compat

from .errors import CalibrationError  # noqa: F401  (its import path since the start)

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


def check_model(model, linears=None) -> None:
    """Raise UnsupportedModelError for an architecture accel cannot patch (the same check as
    `accel.patch`), CalibrationError naming the first targeted linear with a NaN/inf weight.

    linears: (name, module) pairs to check; None checks every nn.Linear of the model."""
    from accel.patches.core import check_supported

    check_supported(model)
    if linears is None:
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, lin in linears:
        w = lin.weight
        if w.device.type != "meta" and not torch.isfinite(w).all():
            bad = int((~torch.isfinite(w)).sum())
            raise CalibrationError(f"{name}.weight holds {bad} NaN/inf value(s); calibrating it would write an "
                                   f"artifact that computes NaN. Fix or reload the model")


def max_positions(model) -> int | None:
    """The model's `max_position_embeddings` (None if it does not say)."""
    cfg = compat.text_config(getattr(model, "config", None))
    v = getattr(cfg, "max_position_embeddings", None)
    return int(v) if isinstance(v, int) and v > 0 else None


def check_seq_len(model, seq_len: int) -> None:
    """CalibrationError unless 1 <= seq_len <= the model's max_position_embeddings."""
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise CalibrationError(f"calibration seq_len must be a positive integer, got {seq_len!r}")
    mp = max_positions(model)
    if mp is not None and seq_len > mp:
        raise CalibrationError(f"calibration seq_len={seq_len} exceeds the model's max_position_embeddings={mp}")


def check_samples(model, samples, min_len: int = 1) -> None:
    """CalibrationError unless `samples` is a non-empty [N, L] integer tensor of token ids in
    [0, vocab_size) with min_len <= L <= max_position_embeddings."""
    if not isinstance(samples, torch.Tensor):
        raise CalibrationError(f"calibration samples must be a torch.Tensor of token ids, got {type(samples).__name__}")
    if samples.dim() != 2 or samples.numel() == 0:
        raise CalibrationError(f"calibration samples must be a non-empty [N, L] tensor, got {tuple(samples.shape)}")
    if samples.dtype.is_floating_point or samples.dtype.is_complex or samples.dtype == torch.bool:
        raise CalibrationError(f"calibration samples must hold integer token ids, got dtype {samples.dtype}")
    if samples.size(1) < min_len:
        raise CalibrationError(f"calibration samples need seq_len >= {min_len}, got {samples.size(1)}")
    check_seq_len(model, int(samples.size(1)))
    vocab = getattr(compat.text_config(getattr(model, "config", None)), "vocab_size", None)
    lo, hi = int(samples.min()), int(samples.max())
    if lo < 0 or (isinstance(vocab, int) and hi >= vocab):
        raise CalibrationError(f"calibration token ids must lie in [0, vocab_size={vocab}), got ids from {lo} to {hi}")


@dataclass
class LayerData:
    """Inputs of the current decoder layer.

    hidden: per chunk `[b, L, hidden]` on CPU. kwargs: per layer index, the keyword arguments the
    model passed to that layer (position embeddings, masks); they do not depend on the hidden
    states, so one capture serves every chunk and layer.
    """

    hidden: list[torch.Tensor]
    layer_kwargs: list[dict[str, Any]]
    chunk_sizes: list[int] = field(default_factory=list)
    # Index of the layer whose outputs `hidden` already holds (a method that ran a joined pass).
    advanced: int | None = None

    @property
    def n_samples(self) -> int:
        return sum(h.size(0) for h in self.hidden)

    def kwargs_for(self, i: int, b: int, device) -> dict[str, Any]:
        out = {}
        for k, v in self.layer_kwargs[i].items():
            out[k] = _fit_batch(v, b, device)
        return out

    def forward(self, layer: nn.Module, i: int, hooks: dict[nn.Module, Callable] | None = None,
                keep_outputs: bool = True) -> list[torch.Tensor]:
        """Run `layer` over every chunk; `hooks` maps submodules to `fn(module, inputs, output)`.

        Returns the outputs (on CPU) when keep_outputs, else an empty list.
        """
        device = _device_of(layer)
        handles = [m.register_forward_hook(fn) for m, fn in (hooks or {}).items()]
        outs = []
        try:
            with torch.no_grad():
                for h in self.hidden:
                    try:
                        y = layer(h.to(device), **self.kwargs_for(i, h.size(0), device))
                    except _StopForward:
                        # A statistics hook has everything it needs from this chunk (early exit).
                        if keep_outputs:
                            raise
                        continue
                    y = y[0] if isinstance(y, (tuple, list)) else y
                    if keep_outputs:
                        outs.append(y.to("cpu"))
        finally:
            for hd in handles:
                hd.remove()
        return outs

    def advance(self, layer: nn.Module, i: int) -> None:
        """Replace the inputs by this (already modified) layer's outputs."""
        self._set_outputs(self.forward(layer, i), i)

    def forward_joined(self, layer: nn.Module, i: int, pre_hooks: dict[nn.Module, Callable]) -> None:
        """One forward of `layer` over all chunks joined into one batch, and advance to its outputs.

        `pre_hooks` maps submodules to `fn(module, args)` forward pre-hooks. Each sees the input of
        every calibration sample at once, so it can compute statistics and change its module (e.g.
        prune it) before the module runs: later submodules then see the changed module's outputs.
        Peak memory grows with the number of calibration tokens (see `joined_bytes`).
        """
        device = _device_of(layer)
        h = torch.cat(self.hidden).to(device)
        handles = [m.register_forward_pre_hook(fn) for m, fn in pre_hooks.items()]
        try:
            with torch.no_grad():
                y = layer(h, **self.kwargs_for(i, h.size(0), device))
        finally:
            for hd in handles:
                hd.remove()
        y = (y[0] if isinstance(y, (tuple, list)) else y).to("cpu")
        del h
        self._set_outputs(list(y.split([c.size(0) for c in self.hidden])), i)

    def _set_outputs(self, outs: list[torch.Tensor], i: int) -> None:
        for h in outs:
            if not torch.isfinite(h).all():
                raise CalibrationError(f"decoder layer {i} produced NaN/inf activations; the model or the "
                                       f"calibration data is broken (or the method's changes to layer {i} are)")
        self.hidden = outs
        self.advanced = i


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _fit_batch(v, b: int | None, device):
    """Move captured kwargs to `device`, and fit any batch dimension to `b` (the last chunk may be
    smaller than the captured one; b=None leaves it). Non-tensors pass through."""
    if isinstance(v, torch.Tensor):
        if b is not None and v.dim() >= 3 and v.size(0) not in (1, b):
            v = v[:1].expand(b, *v.shape[1:])
        return v.to(device)
    if isinstance(v, tuple):
        return tuple(_fit_batch(x, b, device) for x in v)
    if isinstance(v, list):
        return [_fit_batch(x, b, device) for x in v]
    if isinstance(v, dict):
        return {k: _fit_batch(x, b, device) for k, x in v.items()}
    return v


def capture_inputs(model, samples: torch.Tensor, batch_size: int = 8) -> LayerData:
    """Run the model up to its first decoder layer for every sample; record each layer's kwargs.

    samples: [N, L] int64 token ids.
    """
    check_samples(model, samples)
    layers = compat.decoder_layers(model)
    device = next(model.parameters()).device
    kwargs_per_layer: list[dict | None] = [None] * len(layers)
    hidden: list[torch.Tensor] = []
    first = {"done": False}

    def make_pre_hook(idx):
        def pre_hook(mod, args, kwargs):
            if kwargs_per_layer[idx] is None:
                kw = {k: v for k, v in kwargs.items() if k not in compat.CACHE_KWARG_NAMES}
                kw["use_cache"] = False
                kwargs_per_layer[idx] = _fit_batch(kw, None, "cpu")
            if idx == 0:
                hs = args[0] if args else kwargs["hidden_states"]
                hidden.append(hs.detach().to("cpu"))
                if first["done"]:
                    raise _StopForward
            return None
        return pre_hook

    handles = [layer.register_forward_pre_hook(make_pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            # One full forward of a single sample captures every layer's kwargs (Gemma3 gives
            # sliding and global layers different masks and rotary tables); their batch dim is 1
            # and broadcasts. Every chunk then stops at layer 0, so capture costs ~1 sample's forward.
            model(input_ids=samples[:1].to(device), use_cache=False)
            hidden.clear()
            first["done"] = True
            for start in range(0, samples.size(0), batch_size):
                x = samples[start:start + batch_size].to(device)
                try:
                    model(input_ids=x, use_cache=False)
                except _StopForward:
                    pass
    finally:
        for hd in handles:
            hd.remove()
    if any(k is None for k in kwargs_per_layer):
        raise CalibrationError("could not capture the inputs of every decoder layer")
    for k in kwargs_per_layer:
        k.pop("hidden_states", None)
    if not all(torch.isfinite(h).all() for h in hidden):
        raise CalibrationError("the inputs of decoder layer 0 (the embeddings) hold NaN/inf")
    return LayerData(hidden=hidden, layer_kwargs=kwargs_per_layer, chunk_sizes=[h.size(0) for h in hidden])


class LayerMethod(Protocol):
    def process_layer(self, i: int, layer: nn.Module, data: LayerData) -> dict[str, torch.Tensor]: ...

    def restore_layer(self, i: int, layer: nn.Module, tensors: dict[str, torch.Tensor]) -> None: ...


@dataclass
class RunStats:
    layers: int
    resumed_layers: int
    seconds: float
    peak_rss_mb: float
    activation_mb: float
    capture_seconds: float


def _peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_layerwise(model, samples: torch.Tensor, method: LayerMethod, *, batch_size: int = 8,
                  checkpoint_dir: str | os.PathLike | None = None, run_key: dict | None = None,
                  progress: bool = True, desc: str = "calibrate",
                  stop_after: int | None = None, weights: str | None = None) -> RunStats:
    """Calibrate `model` layer by layer with `method`, in place.

    checkpoint_dir: per-layer results go to `layer_XXX.safetensors`; existing ones made for the
    same model, data, `run_key` (the method's settings) and accel version are restored instead of
    recomputed, others are discarded with a warning (see `checkpoint.CheckpointDir`). A layer
    whose checkpoint is unreadable is recomputed, and so is every layer after it.
    `stop_after` (tests) stops after that many layers as an interruption would. `weights`:
    checkpoint.weights_digest(model), when the caller computed it already (see checkpoint_key).
    """
    from .checkpoint import CheckpointDir, checkpoint_key

    t0 = time.perf_counter()
    check_model(model, [])
    check_samples(model, samples)
    ck = None
    if checkpoint_dir is not None:
        # Keyed on the model before any layer changes: a resumed process reloads the original.
        ck = CheckpointDir.open(checkpoint_dir, checkpoint_key(model, samples, run_key, weights))
    data = capture_inputs(model, samples, batch_size)
    t_cap = time.perf_counter() - t0
    layers = compat.decoder_layers(model)
    resumed, recompute = 0, False
    act_mb = sum(h.numel() * h.element_size() for h in data.hidden) / 2**20
    bar = tqdm(total=len(layers), desc=desc, unit="layer", disable=not progress)
    for i, layer in enumerate(layers):
        if stop_after is not None and i >= stop_after:
            break
        t_layer, restored = time.perf_counter(), False
        tensors = ck.load(i) if ck is not None and not recompute else None
        if tensors is not None:
            try:
                method.restore_layer(i, layer, tensors)
                resumed += 1
                restored = True
            except (KeyError, ValueError, CalibrationError) as e:
                # Methods check a checkpoint completely before changing the layer.
                log.warning("layer checkpoint %s does not fit layer %d (%s); recomputing from layer %d",
                            ck.file(i), i, str(e)[:200], i)
                tensors = None
        if tensors is None:
            if ck is not None and not recompute:
                # Checkpoints past a recomputed layer were made from its lost result: drop them.
                ck.discard_from(i)
                recompute = True
            tensors = method.process_layer(i, layer, data)
            if ck is not None:
                ck.save(i, tensors)
        if data.advanced != i:
            data.advance(layer, i)
        bar.update(1)
        # Progress in the log too (a bar is off under --json and in notebooks' logs).
        log.info("%s: layer %d/%d %s in %.1fs", desc, i + 1, len(layers),
                 "restored from its checkpoint" if restored else "done", time.perf_counter() - t_layer)
    bar.close()
    stats = RunStats(len(layers), resumed, time.perf_counter() - t0, _peak_rss_mb(), act_mb, t_cap)
    log.info("layer-wise calibration: %d layers (%d resumed) in %.1fs, peak RSS %.0f MB, activations %.0f MB",
             stats.layers, resumed, stats.seconds, stats.peak_rss_mb, act_mb)
    return stats


def joined_bytes(model, n_tokens: int) -> int:
    """Rough peak bytes of a joined (all samples in one batch) pass of one decoder layer in fp32:
    hidden-sized activations (input, residual, norm, q/o, output) and three MLP-sized ones."""
    cfg = compat.text_config(model.config)
    hidden = int(cfg.hidden_size)
    inter = int(getattr(cfg, "intermediate_size", None) or 4 * hidden)
    return 4 * n_tokens * (6 * hidden + 3 * inter)


def linear_input_stats(layer: nn.Module, data: LayerData, i: int, modules: dict[str, nn.Module],
                       fn: Callable[[str, torch.Tensor], None], early_exit: bool = False) -> None:
    """Run layer `i` over all chunks, calling `fn(name, x)` with each listed submodule's input
    `x: [tokens, in_features]` (fp32). Used for ‖X_j‖ and similar statistics.

    early_exit: stop each chunk's forward as soon as every listed module has seen its input (the
    rest of the layer, e.g. down_proj's matmul, is not computed). Only for modules that run once
    per layer call, as nn.Linear projections do."""
    seen: set[str] = set()

    def make(name):
        def hook(mod, inputs, output=None):
            x = inputs[0]
            fn(name, x.reshape(-1, x.size(-1)).float())
            if early_exit:
                seen.add(name)
                if len(seen) == len(modules):
                    seen.clear()
                    raise _StopForward
        return hook
    if not early_exit:
        data.forward(layer, i, hooks={m: make(n) for n, m in modules.items()}, keep_outputs=False)
        return
    handles = [m.register_forward_pre_hook(make(n)) for n, m in modules.items()]
    try:
        data.forward(layer, i, keep_outputs=False)
    finally:
        for hd in handles:
            hd.remove()
