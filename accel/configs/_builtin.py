"""Imports every built-in method's config module so that they register.

Each method issue adds one import line here.
"""
from . import double_sparsity  # noqa: F401
from . import prune  # noqa: F401
from . import gqsa  # noqa: F401
from . import rsparse  # noqa: F401
