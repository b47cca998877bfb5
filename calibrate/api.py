"""`accel.calibrate(model, config, data=None, output=None, ...) -> Artifact`: the one entry.

    art = accel.calibrate(model, accel.configs.PruneConfig(sparsity=0.5), tokenizer=tok)
    art = accel.calibrate(model, GQSAConfig(bits=4), ["some text", ...], "out/gqsa", tokenizer=tok)

It resolves the data (one set of defaults: accel.data.CalibrationSpec, with the per-method
departures of registry.METHOD_DEFAULTS), runs the method's registered calibrator with
checkpoints on, saves the artifact when `output` is given, and removes the checkpoints after
success. The model is left unchanged.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Callable

import torch

from accel.errors import AccelError

log = logging.getLogger(__name__)


def resolve_config(config_or_recipe):
    """The MethodConfig to calibrate; ConfigError for anything else. A list of one config is
    that config (accel.calibrate sends longer lists and accel.Recipe to calibrate/recipe.py)."""
    from accel.configs import ConfigError, MethodConfig

    cfg = config_or_recipe
    if isinstance(cfg, (list, tuple)):
        if len(cfg) != 1:
            raise ConfigError(f"accel.calibrate: a recipe needs at least one config, got an empty "
                              f"{type(cfg).__name__}" if not cfg else
                              f"a recipe of {len(cfg)} configs goes through accel.calibrate (the package: "
                              f"accel.calibrate.recipe.calibrate_recipe), not accel.calibrate.api")
        cfg = cfg[0]
    if not isinstance(cfg, MethodConfig):
        raise ConfigError(f"accel.calibrate: config_or_recipe must be a MethodConfig (e.g. accel.configs.PruneConfig"
                          f"(...)), an accel.Recipe or a list of MethodConfigs, got {type(cfg).__name__}")
    return cfg


def resolve_samples(model, method: str, data, *, tokenizer=None, num_calibration_samples=None,
                    max_seq_length=None, seed=None, needs_data: bool = True):
    """(samples [N, T] int64 or None, CalibrationSpec describing them).

    data: None (draw from the default source), a CalibrationSpec (its fields, then any of
    num_calibration_samples / max_seq_length / seed that are given), a [N, T] token-id tensor
    (its first num_calibration_samples rows / max_seq_length columns when those are given), or
    a list of strings (tokenized with `tokenizer`, cut into windows of max_seq_length).
    DataError / CalibrationError for anything else or anything that does not fit."""
    from accel.data import CalibrationSpec, DataError, calibration_samples, samples_from_texts

    from .registry import default_spec
    from .runner import check_samples, check_seq_len

    over = dict(n_samples=num_calibration_samples, seq_len=max_seq_length, seed=seed)
    for name, v in (("num_calibration_samples", num_calibration_samples), ("max_seq_length", max_seq_length),
                    ("seed", seed)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "seed" else 1)):
            raise DataError(f"accel.calibrate: {name} must be a {'non-negative' if name == 'seed' else 'positive'} "
                            f"integer, got {v!r}")
    if data is None or isinstance(data, CalibrationSpec):
        spec = default_spec(method, **over) if data is None else dataclasses.replace(
            data, **{k: v for k, v in over.items() if v is not None})
        if not needs_data:
            return None, spec
        if tokenizer is None:
            raise DataError("accel.calibrate: drawing calibration samples from a data source needs tokenizer=...; "
                            "or pass data as a [N, T] tensor of token ids")
        check_seq_len(model, spec.seq_len)
        return calibration_samples(tokenizer, spec), spec
    seed_ = default_spec(method, seed=seed).seed
    if isinstance(data, torch.Tensor):
        x = data
        if x.dim() == 2:
            for dim, want, name in ((0, num_calibration_samples, "num_calibration_samples"),
                                    (1, max_seq_length, "max_seq_length")):
                if want is not None:
                    if x.size(dim) < want:
                        raise DataError(f"accel.calibrate: {name}={want} but data has only {x.size(dim)} "
                                        f"{'rows' if dim == 0 else 'columns'}")
                    x = x.narrow(dim, 0, want)
        check_samples(model, x)
        x = x.to(torch.long)
        spec = CalibrationSpec(source="given", n_samples=int(x.size(0)), seq_len=int(x.size(1)), seed=seed_)
    elif isinstance(data, (list, tuple)) and data and all(isinstance(d, str) for d in data):
        seq_len = max_seq_length or default_spec(method).seq_len
        check_seq_len(model, seq_len)
        x = samples_from_texts(tokenizer, list(data), num_calibration_samples, seq_len)
        check_samples(model, x)
        spec = CalibrationSpec(source="texts", n_samples=int(x.size(0)), seq_len=seq_len, seed=seed_)
    else:
        raise DataError(f"accel.calibrate: data must be None, a CalibrationSpec, a [N, T] tensor of token ids or a "
                        f"non-empty list of strings, got {type(data).__name__}"
                        + (" (empty)" if isinstance(data, (list, tuple)) and not data else ""))
    return (x if needs_data else None), spec


def _remove_tree(path: Path, keep_dir: bool = False) -> None:
    from .checkpoint import remove_checkpoints

    remove_checkpoints(path, keep_dir=keep_dir)


def calibrate(model, config_or_recipe, data=None, output=None, *, tokenizer=None, num_calibration_samples=None,
              max_seq_length=None, seed=None, checkpoint_dir=None, overwrite=False, progress=True):
    """Calibrate `model` for one method config, or a recipe (an `accel.Recipe` or a list of
    configs: stages calibrated in order into one artifact, see calibrate/recipe.py and
    docs/recipes.md); returns the `accel.Artifact` (saved at `output` when given). The model is
    left unchanged.

    data: None | CalibrationSpec | [N, T] token-id tensor | list of strings (see resolve_samples);
        defaults from accel.data.CalibrationSpec and registry.METHOD_DEFAULTS.
    output: artifact directory to write; checked before any work (accel.artifact.check_output_path;
        an existing artifact there is replaced only with overwrite=True).
    checkpoint_dir: per-layer checkpoints, on by default: `<output>.partial` when output is given
        (rerun the same call to resume after an interruption), else a temp dir; removed after
        success. False: no checkpoints. A recipe keeps one sub-directory per stage there.
    A recipe is dispatched by the package's `accel.calibrate` (calibrate/__init__.py), which
    imports this module and calibrate/recipe.py (that one uses resolve_samples from here).
    """
    return _calibrate(model, config_or_recipe, data, output, tokenizer=tokenizer,
                      num_calibration_samples=num_calibration_samples, max_seq_length=max_seq_length, seed=seed,
                      checkpoint_dir=checkpoint_dir, overwrite=overwrite, progress=progress)


def _calibrate(model, config_or_recipe, data=None, output=None, *, tokenizer=None, num_calibration_samples=None,
               max_seq_length=None, seed=None, checkpoint_dir=None, overwrite=False, progress=True,
               before_save: Callable | None = None, calibrator_kwargs: dict | None = None):
    """`calibrate`, plus hooks for the CLI: before_save(artifact, samples) may add to the
    artifact's calibration record; calibrator_kwargs go to the method's function."""
    from accel.artifact import check_output_path

    from .checkpoint import resolve_checkpoint_dir
    from .registry import get_calibrator
    from .runner import CalibrationError, check_model

    cfg = resolve_config(config_or_recipe)
    cal = get_calibrator(cfg.method)
    out = check_output_path(output, overwrite, "artifact") if output is not None else None
    ck, temp = resolve_checkpoint_dir(out, checkpoint_dir, "accel-calibrate-")
    try:
        if ck is not None and ck.exists() and not ck.is_dir():
            raise CalibrationError(f"{ck} (the checkpoint directory) is an existing file; move it or pass another "
                                   f"checkpoint_dir")
        check_model(model, [])
        if cal.check is not None:
            cal.check(model, cfg)
        samples, spec = resolve_samples(model, cfg.method, data, tokenizer=tokenizer,
                                        num_calibration_samples=num_calibration_samples,
                                        max_seq_length=max_seq_length, seed=seed, needs_data=cal.needs_data(cfg))
        existed = ck is not None and ck.exists()
        # A directory the user made (empty before this run) is theirs: only its contents go.
        user_dir = existed and not any(ck.iterdir())
        try:
            art = cal.fn(model, cfg, samples, spec=spec, checkpoint_dir=ck, progress=progress,
                         **(calibrator_kwargs or {}))
        except CalibrationError:
            # Bad data (NaN activations...): a resume could not help, so leave nothing behind.
            if ck is not None and not existed:
                _remove_tree(ck)
            raise
        src = getattr(getattr(model, "config", None), "accel_source", None)
        if isinstance(src, str):
            art.calibration.setdefault("model", src)
        if before_save is not None:
            before_save(art, samples)
        if out is not None:
            art.path = art.save(out, overwrite=overwrite)
        if ck is not None:
            _remove_tree(ck, keep_dir=user_dir)
        return art
    finally:
        if temp:
            shutil.rmtree(ck, ignore_errors=True)


__all__ = ["AccelError", "calibrate", "resolve_config", "resolve_samples"]
