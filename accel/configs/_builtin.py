"""Imports every built-in method's config module so that they register (`accel/configs/__init__.py`
imports this module once `base` is loaded). A new method adds its config module's import here."""
from . import double_sparsity  # noqa: F401
from . import prune  # noqa: F401
from . import gqsa  # noqa: F401
from . import rsparse  # noqa: F401
