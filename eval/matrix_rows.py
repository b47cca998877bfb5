"""The rows of `accel eval matrix`, as data: row name -> recipe (a list of stages in the YAML
shape of docs/recipes.md: `method` plus that config's fields). Every field left out takes the
method's default, and each stage's calibration budget is the method's default unless the command
overrides it (`--num-calibration-samples`, `--max-seq-length`); the output states both.

A composed row `ds+X` is the recipe [Double Sparsity 1/16, X's stage] calibrated in that order, so
X is fitted to the outputs DS attention produces (calibrate/recipe.py); `X+ds` is the other order,
Double Sparsity's channels chosen on the projections X changed. The stage that can make up for
the other's error goes last: GQSA (E2E-OQP fits the model's output) and R-Sparse (thresholds
searched on the activations it sees) after DS; Wanda, which keeps the weights it does not prune
and fits nothing, before it. Measured on SmolLM2 (docs/results.md, "stage order"): ds+wanda-2:4
costs DS 1.068 × on wiki, wanda-2:4+ds 1.005 ×; gqsa-w4s50+ds 1.062 ×, ds+gqsa-w4s50 0.927 ×. `COMPOSED[ds+X] = X` names
the row it is checked against (the issue's composition check, eval/matrix.py).
"""
from __future__ import annotations

_DS = {"method": "double-sparsity", "budget": 0.0625}
_WANDA_24 = {"method": "prune", "init": "wanda", "pattern": "2:4", "sparsity": None}
_RSPARSE_50 = {"method": "rsparse", "sparsity": 0.5}
_GQSA_W4S50 = {"method": "gqsa", "bits": 4, "sparsity": 0.5, "group_size": 16}

ROWS: dict[str, list[dict]] = {
    "dense": [],
    "ds-1/16": [_DS],
    "wanda-50": [{"method": "prune", "init": "wanda", "sparsity": 0.5}],
    "wanda-2:4": [_WANDA_24],
    "wanda-dsnot-60": [{"method": "prune", "init": "wanda", "sparsity": 0.6, "dsnot": True}],
    "rsparse-50": [_RSPARSE_50],
    "gqsa-w4s50": [_GQSA_W4S50],
    "ds+gqsa-w4s50": [_DS, _GQSA_W4S50],
    "ds+rsparse-50": [_DS, _RSPARSE_50],
    "wanda-2:4+ds": [_WANDA_24, _DS],
    # Not in the default set: the other stage orders (see above).
    "ds+wanda-2:4": [_DS, _WANDA_24],
    "gqsa-w4s50+ds": [_GQSA_W4S50, _DS],
}

DESCRIPTIONS = {
    "dense": "the model as loaded (the baseline of every ratio)",
    "ds-1/16": "Double Sparsity, 1/16 of the tokens per decode step, default channels",
    "wanda-50": "Wanda, 50% unstructured",
    "wanda-2:4": "Wanda, 2:4 semi-structured",
    "wanda-dsnot-60": "Wanda masks refined by DSnoT, 60% unstructured",
    "rsparse-50": "R-Sparse, 50% activation sparsity (greedy search)",
    "gqsa-w4s50": "GQSA, 4-bit codes, 50% group sparsity, groups of 16",
    "ds+gqsa-w4s50": "recipe: Double Sparsity 1/16, then GQSA W4S50 fitted on it",
    "ds+rsparse-50": "recipe: Double Sparsity 1/16, then R-Sparse 50% fitted on it",
    "ds+wanda-2:4": "recipe: Double Sparsity 1/16, then Wanda 2:4 fitted on it",
    "wanda-2:4+ds": "recipe: Wanda 2:4, then Double Sparsity 1/16 calibrated on the pruned model",
    "gqsa-w4s50+ds": "recipe: GQSA W4S50, then Double Sparsity 1/16 calibrated on the quantized model",
}

DEFAULT_ROWS = ("dense", "ds-1/16", "wanda-50", "wanda-2:4", "wanda-dsnot-60", "rsparse-50", "gqsa-w4s50",
                "ds+gqsa-w4s50", "ds+rsparse-50", "wanda-2:4+ds")
# Composed row -> the weight-method row it is compared with.
COMPOSED = {"ds+gqsa-w4s50": "gqsa-w4s50", "ds+rsparse-50": "rsparse-50", "ds+wanda-2:4": "wanda-2:4",
            "wanda-2:4+ds": "wanda-2:4", "gqsa-w4s50+ds": "gqsa-w4s50"}
DS_ROW = "ds-1/16"


def check_rows(names) -> list[str]:
    """The row names, in the order given; ConfigError naming an unknown one (and the known ones)."""
    from accel.configs import ConfigError

    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ConfigError(f"--rows: no rows given; known rows: {', '.join(ROWS)}")
    for n in names:
        if n not in ROWS:
            raise ConfigError(f"--rows: unknown row {n!r}; known rows: {', '.join(ROWS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--rows: a row is named twice in {','.join(names)}")
    return names


def recipe(name: str):
    """The row's accel.Recipe, or None for the dense row."""
    from accel.recipe import Recipe

    stages = ROWS[name]
    return Recipe.from_list([dict(s) for s in stages], where=f"matrix row {name}") if stages else None


def has_ds(name: str) -> bool:
    return any(s["method"] == "double-sparsity" for s in ROWS[name])


def safe_name(name: str) -> str:
    """A row name as a file-name part: ds-1/16 -> ds-1_16, wanda-2:4 -> wanda-2-4."""
    return name.replace("/", "_").replace(":", "-").replace("+", "_")
