"""Eager decode's output head on the native GEMV (issue 16): Double Sparsity's patch makes a plain
bf16 CPU lm_head a FastLinear (patches/fast_linear.install_head), recorded like any patch action:
`accel.report` shows it, `accel.unpatch` (also on a deep copy) puts nn.Linear back, fp32 stays on
F.linear, and a weight method stacked after it still patches the model."""
import copy

import pytest
import torch
from torch import nn

import accel
from accel.calibrate.double_sparsity import calibrate_double_sparsity
from accel.configs.double_sparsity import DoubleSparsityConfig
from accel.kernels.dense_linear import cpp_ext
from accel.patches.fast_linear import FastLinear

needs_kernel = pytest.mark.skipif(not cpp_ext.available(), reason="needs a C++ compiler and AVX512-BF16")


def _ds(model):
    samples = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    return calibrate_double_sparsity(model, None, DoubleSparsityConfig(budget=1 / 4, min_context=0, n_dense=1),
                                     samples=samples, progress=False)


@needs_kernel
def test_ds_patch_puts_the_bf16_head_on_the_native_gemv_and_unpatch_restores_it():
    model = accel.models.tiny("llama", dtype=torch.bfloat16)
    art = _ds(model)
    accel.patch(model, art)
    assert type(model.lm_head) is FastLinear
    rows = [r for r in accel.report(model).rows if r["kind"] == "fast-linear"]
    assert [(r["module"], r["kernel"]) for r in rows] == [("lm_head", "dense-native")]
    # The weight-byte totals count replaced linears only: the head's class swap stores nothing new.
    assert accel.report(model).totals().linears == 0
    twin = copy.deepcopy(model)
    ids = torch.randint(1, 512, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 24)
    accel.unpatch(model)
    assert type(model.lm_head) is nn.Linear
    assert type(twin.lm_head) is FastLinear
    accel.unpatch(twin)
    assert type(twin.lm_head) is nn.Linear


def test_fp32_head_stays_plain():
    model = accel.models.tiny("llama")
    accel.patch(model, _ds(model))
    assert type(model.lm_head) is nn.Linear
    assert not [r for r in accel.report(model).rows if r["kind"] == "fast-linear"]
    accel.unpatch(model)


@needs_kernel
def test_weight_method_stacks_after_the_head_swap():
    from accel.calibrate.gqsa import rtn_artifact
    from accel.configs.gqsa import GQSAConfig

    model = accel.models.tiny("llama", dtype=torch.bfloat16)
    ds, gq = _ds(model), rtn_artifact(model, GQSAConfig(bits=4, sparsity=0.5, group_size=16))
    accel.patch(model, ds)
    accel.patch(model, gq)
    methods = accel.report(model).by_method()
    assert methods.get("gqsa", 0) > 0 and type(model.lm_head) is FastLinear
    accel.unpatch(model)
    assert type(model.lm_head) is nn.Linear
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
