"""`accel calibrate recipe RECIPE.yaml --model M --output DIR`: the stages of a YAML recipe
(accel/recipe.py, docs/recipes.md) calibrated in order into one artifact.

The shared calibration options (`accel.cli.add_calibration_args`) apply to every stage that does
not set its own in the YAML (`calibration: {num_calibration_samples: N, ...}`); left out, each
stage takes its method's default. Linears are chosen per stage (`targets` / `ignore` in the YAML),
so there is no --targets / --ignore here. The recipe file and the output are checked before the
model loads; every error is one line and exit code 2.
"""
from __future__ import annotations


def _cmd(args) -> int:
    import accel
    from accel.calibrate.recipe import calibrate_recipe
    from accel.cli import check_output, emit

    recipe = accel.Recipe.from_yaml(args.recipe)  # a bad recipe fails here, before the model loads
    check_output(args)
    model, tok = accel.models.load(args.model, dtype=args.dtype)
    art = calibrate_recipe(model, recipe, None, args.output, tokenizer=tok,
                           num_calibration_samples=args.num_calibration_samples, max_seq_length=args.max_seq_length,
                           seed=args.seed, source=args.source, checkpoint_dir=args.checkpoint_dir,
                           overwrite=args.overwrite, progress=not args.json)
    emit({"artifact": str(art.path), "recipe": recipe.to_dict(), "calibration": art.calibration}, args.json,
         f"wrote {art.path} ({' + '.join(recipe.methods)})")
    return 0


def register(cli) -> None:
    from accel.cli import add_calibration_args

    p = cli.add("calibrate", "recipe", "calibrate the stages of a YAML recipe in order into one artifact "
                                       "(docs/recipes.md)")
    p.add_argument("recipe", metavar="RECIPE.yaml", help="the recipe: a YAML list of stages, each "
                                                         "`- method: NAME` followed by that config's fields")
    add_calibration_args(p, None, linears=False)
    p.set_defaults(func=_cmd)
