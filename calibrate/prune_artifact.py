"""The "prune" calibrator (magnitude / Wanda / DSnoT are one method, chosen by PruneConfig), and
`calibrate_prune`, the keyword form the `accel calibrate wanda|dsnot|magnitude` commands call.

    art = accel.calibrate(model, PruneConfig(sparsity=0.5, dsnot=True), tokenizer=tok)

`prune_model` (prune.py) prunes a model in place; the calibrator runs it on the model, builds
the artifact from the masks and restores the original weights, so the model is unchanged.
"""
from __future__ import annotations

import logging
import time

import torch

from accel.artifact import Artifact
from accel.patches.prune import pack_mask

from .registry import preserved_weights, register_calibrator

log = logging.getLogger(__name__)


def _check(model, config) -> None:
    from .prune import selected_linears
    from .runner import check_model

    check_model(model, selected_linears(model, config))


@register_calibrator("prune", needs_data=lambda cfg: cfg.needs_data, check=_check)
def calibrate_prune_model(model, config, samples: torch.Tensor | None, *, spec, checkpoint_dir=None,
                          progress: bool = True, batch_size: int = 8, mode: str = "auto") -> Artifact:
    """registry.py's calling shape. samples None only for plain magnitude pruning.

    mode: "joined" | "two-pass" | "auto" (see prune.prune_model). The weights are copied to the
    CPU while the model is pruned and restored afterwards (also on error)."""
    from .prune import prune_model, selected_linears
    from .runner import check_model

    check_model(model, [])
    linears = selected_linears(model, config)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    cpu0 = time.process_time()
    with preserved_weights(linears):
        info = prune_model(model, config, samples if config.needs_data else None, batch_size=batch_size,
                           checkpoint_dir=checkpoint_dir if config.needs_data else None, progress=progress,
                           mode=mode)
    cpu = time.process_time() - cpu0
    nz = sum(int(k.sum()) for k in info.masks.values())
    tot = sum(k.numel() for k in info.masks.values())
    run = info.run
    calib = {"dtype": dtype, "data": spec.to_dict() if config.needs_data else None,
             "seconds": info.seconds, "cpu_seconds": cpu,
             "peak_rss_mb": run.peak_rss_mb if run else None, "activation_mb": run.activation_mb if run else None,
             "resumed_layers": run.resumed_layers if run else 0, "mode": info.mode,
             "dsnot_swaps": info.dsnot_swaps, "sparsity_measured": 1 - nz / tot, "linears": len(info.masks)}
    # Built on the restored model: the fingerprint is the dense model's, the one users patch.
    return Artifact.for_model(model, config, tensors={f"prune/{n}": pack_mask(k) for n, k in info.masks.items()},
                              calibration=calib)


def calibrate_prune(output: str, init: str = "wanda", dsnot: bool = False, model_name: str = "smollm2-135m",
                    sparsity: float | None = 0.5, pattern: str = "unstructured", use_variant: bool = False,
                    n_samples: int | None = None, seq_len: int | None = None, seed: int | None = None,
                    max_cycles: int = 50, threshold: float = 0.1, objective: str | None = None,
                    targets: list[str] | None = None, ignore: list[str] | None = None,
                    batch_size: int = 8, dtype: str = "float32", progress: bool = True,
                    model=None, tokenizer=None, samples=None, mode: str = "auto", overwrite: bool = False,
                    checkpoint_dir=None) -> dict:
    """Calibrate and save a prune artifact at `output` through `accel.calibrate`; returns a summary
    (the artifact's calibration record plus the time of one plain forward over the same samples,
    the unit of the README's calibration-time ratios). Every input is checked before anything is
    written; checkpoints go to `<output>.partial/` (rerun to resume) and are removed once the
    artifact is saved. `model`/`tokenizer`/`samples` ([N, L]) replace loading `model_name` and
    sampling the calibration split. Unset n_samples/seq_len/seed: CalibrationSpec's defaults."""
    from accel.artifact import check_output_path
    from accel.configs.prune import PruneConfig

    from .api import _calibrate
    from .prune import load_source, time_forward

    extra = {} if objective is None else {"dsnot_objective": objective}
    cfg = PruneConfig(init=init, dsnot=dsnot, sparsity=sparsity, pattern=pattern, use_variant=use_variant,
                      max_cycles=max_cycles, threshold=threshold, targets=targets, ignore=list(ignore or []), **extra)
    # Fail before loading or calibrating anything: the output (and its checkpoint dir, in _calibrate).
    out = check_output_path(output, overwrite, "artifact")
    partial = out.with_name(out.name + ".partial")
    if checkpoint_dir is None and partial.exists() and not partial.is_dir():
        from .runner import CalibrationError
        raise CalibrationError(f"{partial} (the checkpoint directory of {out}) is an existing file; "
                               f"move it or choose another output")
    loaded = model is None
    if loaded:
        model, tokenizer = load_source(model_name, getattr(torch, dtype))
    timing = {}

    def before_save(art, x):
        cpu0 = time.process_time()
        fwd = time_forward(model, x, batch_size) if x is not None else None
        cpu_fwd = time.process_time() - cpu0
        c = art.calibration
        if loaded:  # a given model keeps what _calibrate recorded (its accel_source), not the default name
            c["model"] = model_name
        c.update(forward_seconds=fwd, time_ratio=c["seconds"] / fwd if fwd else None, forward_cpu_seconds=cpu_fwd,
                 cpu_time_ratio=c["cpu_seconds"] / cpu_fwd if fwd else None)
        timing.update(c)

    if samples is not None:  # given samples are used whole (n_samples / seq_len describe drawn ones)
        n_samples = seq_len = None
    _calibrate(model, cfg, samples, out, tokenizer=tokenizer, num_calibration_samples=n_samples,
               max_seq_length=seq_len, seed=seed, checkpoint_dir=checkpoint_dir, overwrite=overwrite,
               progress=progress, before_save=before_save, calibrator_kwargs={"batch_size": batch_size, "mode": mode})
    return {"output": str(out), "method": cfg.label, "pattern": cfg.pattern, "sparsity": cfg.sparsity, **timing}
