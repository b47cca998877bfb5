"""Dense linear: a native bf16 GEMV for decode steps on CPU (issue 19).

Layout: dense_cpu.cpp (the kernel and the op `accel::dense_linear`, defined in C++),
cpp_ext.py (build, the op's fake implementation, the design), cpu.py (`dense_linear`: the kernel
where it applies, F.linear elsewhere), reference.py (the spec: F.linear). Nothing is built on
import: `cpp_ext.available()` builds the kernel and registers the op the first time it is asked.
patches/fast_linear.py swaps it into a model's plain nn.Linears (accel.compile does).
"""
from .cpp_ext import MAX_ROWS, available  # noqa: F401
from .cpu import dense_linear, usable  # noqa: F401
from .reference import dense_linear_reference  # noqa: F401
