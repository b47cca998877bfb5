"""GQSA linear: group-sparse, group-quantized weights (format, reference, CPU and Triton paths).

Layout: format.py (the stored format), reference.py (the spec), cpu.py (`CPUGQSA`, entry and
CPU implementation), triton_kernel.py (`gqsa_linear_triton`, entry and Triton implementation),
ops.py (`accel::gqsa_linear`, whose body calls those implementations); the C++ op
`accel::gqsa_mm_cpu` (gqsa_op.cpp, fake in cpp_ext.py), which compiled CPU graphs call. Imported here first, so
the op is registered before any module of this folder can run; cpu.py and triton_kernel.py never
import ops.py (it imports them).
"""
from . import ops  # noqa: F401  (registers torch.ops.accel.gqsa_linear)
from .format import GQSAFormatError, GQSAWeight, pack_weight  # noqa: F401
from .reference import gqsa_linear_reference  # noqa: F401
