"""Imports each built-in method's runtime module so that it registers its applier
(`@register_method`); `patches/__init__.py` imports this module. A new method adds its module here."""
from . import double_sparsity  # noqa: F401
from . import prune  # noqa: F401
from . import gqsa  # noqa: F401
from . import rsparse  # noqa: F401
