"""Calibration: `accel.calibrate(model, config, data=None, output=None, ...) -> Artifact`.

The package itself is callable (its module class has a `__call__`), so `accel.calibrate(...)`
runs calibration while `import accel.calibrate.prune` and friends keep working. Nothing heavy is
imported here: the entry (`api.py`) and the methods load on the first call.
"""
import sys as _sys
import types as _types


def calibrate(model, config_or_recipe, data=None, output=None, **kwargs):
    """See `accel.calibrate.api.calibrate`; a recipe (an accel.Recipe or a list of several
    configs) goes to `accel.calibrate.recipe.calibrate_recipe` (docs/recipes.md)."""
    from accel.recipe import is_recipe

    if is_recipe(config_or_recipe):
        from .recipe import calibrate_recipe

        return calibrate_recipe(model, config_or_recipe, data, output, **kwargs)
    from .api import calibrate as _calibrate

    return _calibrate(model, config_or_recipe, data, output, **kwargs)


def register_calibrator(method, **kwargs):
    """See `accel.calibrate.registry.register_calibrator`."""
    from .registry import register_calibrator as _register

    return _register(method, **kwargs)


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        return calibrate(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
