"""GQSA linear: group-sparse, group-quantized weights (format, reference, CPU and Triton paths)."""
from .format import GQSAFormatError, GQSAWeight, pack_weight  # noqa: F401
from .reference import gqsa_linear_reference  # noqa: F401
