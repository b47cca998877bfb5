"""Calibrating a recipe: the stages in order, each on the model with the earlier stages applied,
saved as one artifact. `accel.calibrate(model, accel.Recipe([...]) or [cfg1, cfg2], ...)` lands here.

Order of work, so that bad input fails before any calibration:
  1. the output path (check_output_path) and the checkpoint directory;
  2. the model (supported, not already patched), every stage's calibrator and its `check`;
  3. the stacking rules on the model (`accel.patches.stacking.check_recipe`);
  4. every stage's calibration samples (a stage's own `calibration` settings, then the call's,
     then the method's defaults);
  5. the stages: stage i runs on the model patched with stages < i, where a Double Sparsity stage
     runs in its every-query-row scoring mode (`score_mode="sparse"`, whatever the saved config
     says), so later stages are fitted to the outputs DS attention produces in a forward
     without a cache (each row attends to `budget` of the calibration window's keys, picked by
     its labels; the first `n_dense` layers and Gemma3's sliding layers stay dense);
  6. one artifact at `output`; the model is unpatched again (left as it was).

Resume (checkpoint.py, "Recipes"): each finished stage's artifact is kept under
`<checkpoint_dir>/stage_XX/artifact`, keyed by the dense model's weights, the stage's data and
config, the accel version and the tensors of every earlier stage; a rerun reuses the stages
that match and resumes the interrupted one from its layer checkpoints. A stage that fails writes
nothing at `output` and keeps the earlier stages (a CalibrationError, bad data that a resume
cannot fix, also drops that stage's own new checkpoints, as a single calibration does).
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def for_calibration(art):
    """The in-memory artifact a later stage is calibrated on: Double Sparsity scores every query
    row (its scoring mode; a forward without a cache would otherwise be dense with score_mode
    "dense"), and no KV offload (calibration forwards have no cache to place)."""
    from accel.artifact import Artifact

    configs = []
    for c in art.configs:
        if c.method == "double-sparsity":
            c = dataclasses.replace(c, score_mode="sparse", offload=None, offload_dir=None)
        configs.append(c)
    return Artifact(configs=configs, tensors=art.tensors, fingerprint=art.fingerprint)


def _stage_data(i, model, cfg, cal, data, stage_over, call_over, source, tokenizer):
    """(samples, spec) of stage i: its own settings, then the call's, then the method's defaults."""
    from accel.configs import ConfigError

    from .api import resolve_samples
    from .registry import default_spec

    over = {k: stage_over.get(k, call_over[k]) for k in call_over}
    source = stage_over.get("source", source)
    if source is not None:
        if data is not None:
            raise ConfigError(f"recipe stage {i + 1} ({cfg.method}): a calibration source ({source!r}) applies only "
                              f"when accel draws the data (data=None), but data was given")
        data = default_spec(cfg.method, source=source)
    return resolve_samples(model, cfg.method, data, tokenizer=tokenizer, needs_data=cal.needs_data(cfg), **over)


def calibrate_recipe(model, recipe, data=None, output=None, *, tokenizer=None, num_calibration_samples=None,
                     max_seq_length=None, seed=None, checkpoint_dir=None, overwrite=False, progress=True,
                     source: str | None = None):
    """See the module docstring and `accel.calibrate`; returns the combined `accel.Artifact`.
    source: the data source every stage without its own draws from (the CLI's --source)."""
    from accel.artifact import Artifact, check_output_path, fingerprint
    from accel.patches.core import PatchConflictError, claims_of, get_applier, is_patched, patch, unpatch
    from accel.patches.stacking import check_recipe
    from accel.recipe import as_recipe

    from .checkpoint import resolve_checkpoint_dir, weights_digest
    from .recipe_checkpoint import RecipeCheckpoints, stage_key, tensors_digest
    from .registry import get_calibrator
    from .runner import CalibrationError, check_model

    recipe = as_recipe(recipe)
    n = len(recipe)
    out = check_output_path(output, overwrite, "artifact") if output is not None else None
    ck, temp = resolve_checkpoint_dir(out, checkpoint_dir, "accel-recipe-")
    try:
        cks = RecipeCheckpoints(ck) if ck is not None else None
        check_model(model, [])
        if is_patched(model):
            raise PatchConflictError("accel.calibrate(recipe): the model is already patched; a recipe calibrates "
                                     "the dense model (its stages are applied in turn): call accel.unpatch(model) "
                                     "first")
        cals = [get_calibrator(c.method) for c in recipe.stages]
        for c in recipe.stages:
            get_applier(c.method)  # imports the runtime module, which registers the method's claims
        check_recipe(model, recipe.stages, claims_of)
        for cal, c in zip(cals, recipe.stages):
            if cal.check is not None:
                cal.check(model, c)
        call_over = dict(num_calibration_samples=num_calibration_samples, max_seq_length=max_seq_length, seed=seed)
        drawn = [_stage_data(i, model, c, cal, data, so, call_over, source, tokenizer)
                 for i, (c, cal, so) in enumerate(zip(recipe.stages, cals, recipe.calibration))]
        fp = fingerprint(model)
        weights = weights_digest(model) if cks is not None else None
        arts = []
        try:
            for i, (cfg, cal, (samples, spec)) in enumerate(zip(recipe.stages, cals, drawn)):
                what = f"recipe stage {i + 1}/{n} ({cfg.method})"
                st = None
                if cks is not None:
                    earlier = [{"config": a.configs[0].to_dict(), "tensors": tensors_digest(a.tensors)} for a in arts]
                    st = cks.stage(i, stage_key(fp, weights, samples, cfg.to_dict(), earlier))
                art = st.finished() if st is not None else None
                if art is not None:
                    log.info("%s: finished in an earlier run; reusing %s", what, st.path / "artifact")
                else:
                    log.info("%s: calibrating%s", what, f" on the model patched with {', '.join(recipe.methods[:i])}"
                             if i else "")
                    if st is not None:
                        st.open()
                    try:
                        art = cal.fn(model, cfg, samples, spec=spec, checkpoint_dir=st.layers if st else None,
                                     progress=progress)
                    except CalibrationError:
                        if st is not None:
                            st.discard_new()
                        raise
                    if st is not None:
                        st.finish(art)
                arts.append(art)
                if i + 1 < n:
                    patch(model, for_calibration(art))
        finally:
            unpatch(model)
        configs = [a.configs[0] for a in arts]
        tensors = {k: v for a in arts for k, v in a.tensors.items()}
        calib = {"recipe": recipe.to_dict(), "stages": [a.calibration for a in arts],
                 "fitted_on": "each stage calibrated on the model patched with the stages before it "
                              "(double-sparsity in its every-query-row scoring mode)"}
        src = getattr(getattr(model, "config", None), "accel_source", None)
        if isinstance(src, str):
            calib["model"] = src
        combined = Artifact(configs=configs, tensors=tensors, fingerprint=fp, calibration=calib)
        if out is not None:
            combined.path = combined.save(out, overwrite=overwrite)
        if cks is not None:
            cks.remove()
        return combined
    finally:
        if temp:
            shutil.rmtree(ck, ignore_errors=True)


__all__ = ["calibrate_recipe", "for_calibration"]
