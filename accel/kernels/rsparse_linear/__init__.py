"""R-Sparse linear: y = W[:, S]·x_S + U_r (Σ Vᵀ)_r x_{not S}, S = {i : |x_i|·scale_i > threshold}.

`rsparse_linear(...)` dispatches to the Triton kernel (CUDA), the CPU path, or the reference.
"""
from .reference import channel_mask, rsparse_linear_ref  # noqa: F401


def rsparse_linear(x, weight, scale, threshold, down=None, up=None, bias=None, *, path: str = "reference",
                   weight_t=None):
    """x: [..., in]; weight: [out, in]; scale: [in]; threshold: float; down: [r, in]; up: [out, r].

    weight_t: [in, out] contiguous copy of weight.T (the CPU and Triton paths read columns of W
    as contiguous rows; built on the fly when not given). `accel::rsparse_linear` under torch.compile.
    """
    from accel.kernels import ops

    return ops.call("rsparse_linear", rsparse_impl, x, weight, scale, float(threshold), down, up, bias, weight_t,
                    None, path)


def rsparse_impl(x, weight, scale, threshold: float, down, up, bias, weight_t, thr_vec, path: str):
    """The body of `accel::rsparse_linear`."""
    if path == "triton":
        from .triton_kernel import rsparse_linear_triton
        return rsparse_linear_triton(x, weight_t if weight_t is not None else weight.t().contiguous(),
                                     scale, threshold, down, up, bias)
    if path == "cpu":
        from .cpu import rsparse_cpu_impl
        return rsparse_cpu_impl(x, weight, scale, threshold, down, up, bias, weight_t, thr_vec)
    return rsparse_linear_ref(x, weight, scale, threshold, down, up, bias)
