"""Imports every built-in method's config module so that they register.

Each method issue adds one import line here.
"""
from . import rsparse  # noqa: F401
