"""Imports every built-in method's config module so that they register.

Each method issue adds one import line here.
"""
from . import gqsa  # noqa: F401
from . import prune  # noqa: F401
