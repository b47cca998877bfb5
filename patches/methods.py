"""Imports each built-in method's runtime module so that it registers its applier.

Each method issue adds one import line here.
"""
from . import double_sparsity  # noqa: F401
from . import prune  # noqa: F401
from . import gqsa  # noqa: F401
from . import rsparse  # noqa: F401
