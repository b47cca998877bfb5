"""R-Sparse linear: y = W[:, S]·x_S + U_r (Σ Vᵀ)_r x_{not S}, S = {i : |x_i|·scale_i > threshold}.

`rsparse_linear(...)` dispatches to the Triton kernel (CUDA), the CPU path, or the reference.

Layout: this module and cpu.py (`rsparse_linear_cpu`) hold the entries; impl.py the op body;
ops.py registers it as `accel::rsparse_linear`. Imported here first, so the op exists before any
module of this folder can run; cpu.py never imports ops.py (ops.py -> impl.py imports it).
"""
from accel.kernels.ops import call

# Registers torch.ops.accel.rsparse_linear before any entry of this folder can run.
from . import ops  # noqa: F401
from .impl import rsparse_impl
from .reference import channel_mask, rsparse_linear_ref  # noqa: F401


def rsparse_linear(x, weight, scale, threshold, down=None, up=None, bias=None, *, path: str = "reference",
                   weight_t=None):
    """x: [..., in]; weight: [out, in]; scale: [in]; threshold: float; down: [r, in]; up: [out, r].

    weight_t: [in, out] contiguous copy of weight.T (the CPU and Triton paths read columns of W
    as contiguous rows; built on the fly when not given). `accel::rsparse_linear` under torch.compile.
    """
    return call("rsparse_linear", rsparse_impl, x, weight, scale, float(threshold), down, up, bias, weight_t,
                None, path)
