"""`accel.Recipe`: an ordered list of method configs, calibrated in order into one artifact.

    recipe = accel.Recipe([DoubleSparsityConfig(), PruneConfig(pattern="2:4")])
    recipe = accel.Recipe.from_yaml("recipe.yaml")     # a path, or the YAML text itself
    art = accel.calibrate(model, recipe, output="ds_wanda")

The YAML shape (docs/recipes.md) is a list of stages; a stage is a mapping with `method` (a
config's method name), that config's fields, and optionally `calibration` (this stage's own
num_calibration_samples / max_seq_length / seed / source):

    - method: double-sparsity
      heavy_channels: 8
    - method: prune
      pattern: "2:4"
      calibration: {num_calibration_samples: 32}

Nothing else is accepted (parsed with yaml.safe_load; an unknown key is named). Which stages
may be combined is checked against the model before any calibration
(`accel.patches.stacking.check_recipe`); here only what needs no model: a method appears at
most once (an artifact keys its tensors by method name).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from . import methods as _methods
from .configs import ConfigError, MethodConfig, get_config_class

# A stage's own calibration settings (the keyword arguments of accel.calibrate they override).
STAGE_CALIBRATION_KEYS = ("num_calibration_samples", "max_seq_length", "seed", "source")
# The prune method's command-line names, for the hint of an unknown method.
_ALIASES = {"wanda": "prune (init: wanda)", "dsnot": "prune (dsnot: true)", "magnitude": "prune (init: magnitude)"}
SHAPE = ("a YAML list of stages, each a mapping like `- method: prune` followed by that config's fields "
         "(and optionally `calibration: {num_calibration_samples: N, max_seq_length: T, seed: S, source: NAME}`)")


def calibratable_methods() -> list[str]:
    """The methods a recipe stage may name: those in the manifest with a calibrator."""
    return sorted(m for m, r in _methods.methods().items() if r.calibrator)


def _check_calibration(i: int, method: str, cal: Any) -> dict:
    if cal is None:
        return {}
    if not isinstance(cal, Mapping):
        raise ConfigError(f"recipe stage {i + 1} ({method}): calibration must be a mapping of "
                          f"{', '.join(STAGE_CALIBRATION_KEYS)}, got {cal!r}")
    unknown = sorted(set(cal) - set(STAGE_CALIBRATION_KEYS))
    if unknown:
        raise ConfigError(f"recipe stage {i + 1} ({method}): unknown calibration key(s) {unknown}; expected some of "
                          f"{list(STAGE_CALIBRATION_KEYS)}")
    for k, v in cal.items():
        if k == "source":
            if not isinstance(v, str) or not v:
                raise ConfigError(f"recipe stage {i + 1} ({method}): calibration.source must be a data source name "
                                  f"(such as wiki), got {v!r}")
            continue
        lo = 0 if k == "seed" else 1
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ConfigError(f"recipe stage {i + 1} ({method}): calibration.{k} must be an integer >= {lo}, "
                              f"got {v!r}")
    return dict(cal)


@dataclass(frozen=True)
class Recipe:
    """Ordered method configs (`stages`) and, per stage, its own calibration settings
    (`calibration[i]`: a dict with some of STAGE_CALIBRATION_KEYS; empty = the call's)."""

    stages: tuple[MethodConfig, ...]
    calibration: tuple[Mapping[str, int], ...] = ()

    def __init__(self, stages, calibration=None):
        if isinstance(stages, Recipe):
            stages, calibration = stages.stages, stages.calibration if calibration is None else calibration
        if isinstance(stages, MethodConfig) or not isinstance(stages, (list, tuple)):
            raise ConfigError(f"accel.Recipe: stages must be a list of MethodConfig, got {type(stages).__name__}")
        if not stages:
            raise ConfigError("accel.Recipe: a recipe needs at least one stage (a MethodConfig)")
        for i, c in enumerate(stages):
            if not isinstance(c, MethodConfig):
                raise ConfigError(f"accel.Recipe: stage {i + 1} must be a MethodConfig (e.g. accel.configs.prune."
                                  f"PruneConfig(...)), got {type(c).__name__}")
        cal = list(calibration) if calibration else [{}] * len(stages)
        if len(cal) != len(stages):
            raise ConfigError(f"accel.Recipe: calibration has {len(cal)} entries for {len(stages)} stages")
        cal = [_check_calibration(i, c.method, x) for i, (c, x) in enumerate(zip(stages, cal))]
        first: dict[str, int] = {}
        for i, c in enumerate(stages):
            if c.method in first:
                raise ConfigError(f"recipe stages {first[c.method] + 1} and {i + 1} are both {c.method}: a method "
                                  f"appears at most once in a recipe (its artifact tensors are keyed by method "
                                  f"name); put both in one stage, with targets/ignore choosing its linears")
            first[c.method] = i
        object.__setattr__(self, "stages", tuple(stages))
        object.__setattr__(self, "calibration", tuple(cal))

    def __len__(self) -> int:
        return len(self.stages)

    @property
    def methods(self) -> list[str]:
        return [c.method for c in self.stages]

    # -- YAML -------------------------------------------------------------------------------
    @classmethod
    def from_list(cls, doc: Any, where: str = "recipe") -> "Recipe":
        """A recipe from the parsed YAML document (see the module docstring for its shape)."""
        if not isinstance(doc, list) or not doc:
            got = "an empty list" if isinstance(doc, list) else type(doc).__name__
            raise ConfigError(f"{where}: expected {SHAPE}; got {got}")
        stages, cal = [], []
        for i, st in enumerate(doc):
            if not isinstance(st, Mapping) or not isinstance(st.get("method"), str):
                raise ConfigError(f"{where}: stage {i + 1} must be a mapping with a `method: NAME` key, got {st!r}; "
                                  f"expected {SHAPE}")
            fields = dict(st)
            method = fields.pop("method")
            try:
                if method not in calibratable_methods():
                    raise ConfigError(method)
                cfg_cls = get_config_class(method)
            except ConfigError:
                hint = f" ({method} is method: {_ALIASES[method]})" if method in _ALIASES else ""
                raise ConfigError(f"{where}: stage {i + 1}: unknown method {method!r}{hint}; known methods: "
                                  f"{', '.join(calibratable_methods())}") from None
            cal.append(_check_calibration(i, method, fields.pop("calibration", None)))
            try:
                stages.append(cfg_cls.from_params(fields))
            except ConfigError as e:
                raise ConfigError(f"{where}: stage {i + 1}: {e}") from None
            except TypeError as e:  # a field with no default left out
                raise ConfigError(f"{where}: stage {i + 1} ({method}): {e}") from None
        try:
            return cls(stages, cal)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike) -> "Recipe":
        """A recipe from a YAML file (a path) or YAML text (a string holding a newline or a `-`
        list item). Only plain YAML (safe_load): no tags, nothing executed."""
        import yaml

        text, where = None, "recipe"
        if isinstance(path_or_text, os.PathLike) or (isinstance(path_or_text, str) and "\n" not in path_or_text
                                                     and not path_or_text.lstrip().startswith("-")):
            p = Path(path_or_text)
            if not p.is_file():
                raise ConfigError(f"recipe file {p} does not exist (pass a path to a YAML file, or the YAML text)")
            try:
                text = p.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"recipe file {p} is unreadable: {e}") from None
            where = str(p)
        elif isinstance(path_or_text, str):
            text = path_or_text
        else:
            raise ConfigError(f"Recipe.from_yaml: expected a path or YAML text, got {type(path_or_text).__name__}")
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: not valid YAML: {' '.join(str(e).split())}") from None
        return cls.from_list(doc, where)

    def to_dict(self) -> list[dict[str, Any]]:
        """The YAML document: one mapping per stage (method, every field, calibration if any)."""
        out = []
        for cfg, cal in zip(self.stages, self.calibration):
            d = {"method": cfg.method, **cfg.to_dict()["params"]}
            if cal:
                d["calibration"] = dict(cal)
            out.append(d)
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def is_recipe(spec) -> bool:
    """Whether `accel.calibrate` takes the recipe path (calibrate/recipe.py): an accel.Recipe, or
    a list of several configs (a list of one config is that config)."""
    return isinstance(spec, Recipe) or (isinstance(spec, (list, tuple)) and len(spec) > 1)


def as_recipe(spec) -> Recipe:
    """A Recipe from a Recipe or a list of MethodConfigs (ConfigError otherwise)."""
    return spec if isinstance(spec, Recipe) else Recipe(spec)


__all__ = ["Recipe", "STAGE_CALIBRATION_KEYS", "as_recipe", "calibratable_methods", "is_recipe"]
