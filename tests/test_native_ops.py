"""The C++ ops listed in accel.kernels.ops.NATIVE_OPS exist once their extension is loaded."""
import importlib

import pytest
import torch

from accel.kernels import ops

_FOLDER = {"gqsa_mm_cpu": "gqsa_linear", "rsparse_decode": "rsparse_linear", "dense_linear": "dense_linear"}


@pytest.mark.parametrize("name", ops.NATIVE_OPS)
def test_native_op_is_registered_after_its_extension_loads(name):
    assert name in _FOLDER, f"{name}: add its kernel folder to this test"
    ext = importlib.import_module(f"accel.kernels.{_FOLDER[name]}.cpp_ext")
    if not ext.available():
        pytest.skip("no C++ compiler / AVX-512 here: the native op is not built")
    assert hasattr(torch.ops.accel, name), name
    # A C++ op has a schema the dispatcher knows, and a fake (Meta) kernel for torch.compile.
    op = getattr(torch.ops.accel, name).default
    assert op._schema.name == f"accel::{name}"
