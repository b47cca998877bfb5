"""Compiled Triton (unlike TRITON_INTERPRET=1, which CI uses) refuses @jit code that reads a
plain Python global; only tl.constexpr globals are allowed. Found on an H200 (DS's FLT_MAX)."""
import ast
import importlib
import inspect
import textwrap

import pytest

triton = pytest.importorskip("triton")

MODULES = ["accel.kernels.ds_attention.triton_kernel", "accel.kernels.gqsa_linear.triton_kernel",
           "accel.kernels.rsparse_linear.triton_kernel"]


@pytest.mark.parametrize("name", MODULES, ids=lambda n: n.split(".")[2])
def test_jit_functions_read_only_constexpr_globals(name):
    mod = importlib.import_module(name)
    # JITFunction, or InterpretedFunction under TRITON_INTERPRET=1: both wrap the Python function in .fn.
    jitted = [v for v in vars(mod).values() if type(v).__name__ in ("JITFunction", "InterpretedFunction")]
    assert jitted, f"{name} defines no @triton.jit function"
    for fn in jitted:
        names = {n.id for n in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(fn.fn)))) if isinstance(n, ast.Name)}
        for n in names:
            v = vars(mod).get(n)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                pytest.fail(f"{fn.fn.__name__} reads the plain global {n} = {v!r}; "
                            "make it tl.constexpr")
