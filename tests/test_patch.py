"""patch / unpatch / patched: exactness, restoration, report, errors."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import accel
from accel.patches import attention as accel_attention
from accel.patches.linear import IdentityLinear


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("arch", accel.models.TINY_ARCHS)
def test_identity_patch_is_bit_identical_and_unpatch_restores(arch, monkeypatch):
    model = accel.models.tiny(arch)
    x = torch.randint(0, 512, (2, 45), generator=torch.Generator().manual_seed(42))
    before_modules = {n: m for n, m in model.named_modules()}
    ref = _logits(model, x)

    calls = []
    real = accel_attention.accel_attention_forward
    monkeypatch.setattr(accel_attention, "accel_attention_forward",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    accel.patch(model, accel.IdentityConfig())
    assert model.config._attn_implementation == "accel"
    assert isinstance(model.model.layers[0].mlp.down_proj, IdentityLinear)
    patched = _logits(model, x)
    # Attention really ran through accel's registry entry, once per layer.
    assert len(calls) == model.config.num_hidden_layers
    assert torch.equal(ref, patched)

    accel.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert {n: m for n, m in model.named_modules()}.keys() == before_modules.keys()
    assert all(m is before_modules[n] for n, m in model.named_modules())
    assert torch.equal(ref, _logits(model, x))
    assert not accel.is_patched(model)


@pytest.mark.slow
def test_identity_patch_smollm2_bit_identical(smollm2):
    model, tok = smollm2
    x = tok("The quick brown fox jumps over the lazy dog. " * 6, return_tensors="pt").input_ids
    ref = _logits(model, x)
    with accel.patched(model, accel.IdentityConfig()):
        assert torch.equal(ref, _logits(model, x))
        assert len(accel.report(model)) == 30 + 30 * 7
    assert not accel.is_patched(model)
    assert torch.equal(ref, _logits(model, x))


def test_model_patch_method_and_context_manager():
    model = accel.models.tiny("llama")
    out = model.patch(accel.IdentityConfig(attention=False))
    assert out is model and accel.is_patched(model)
    assert model.config._attn_implementation == "sdpa"  # attention untouched by this config
    model.unpatch()
    with accel.patched(model) as m:
        assert m is model and accel.is_patched(model)
    assert not accel.is_patched(model)


def test_report_lists_layers_methods_and_kernel_paths():
    model = accel.models.tiny("qwen3")
    assert "not patched" in str(accel.report(model))
    accel.patch(model, accel.IdentityConfig())
    rep = accel.report(model)
    kinds = {r["kind"] for r in rep.rows}
    assert kinds == {"attention", "linear"}
    assert rep.by_method() == {"identity": 4 + 4 * 7}
    assert {r["kernel"] for r in rep.rows} == {"dense"}
    assert "model.layers.3.mlp.down_proj" in str(rep)


def test_unsupported_architecture_is_named():
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)
    model = GPT2LMHeadModel(cfg)
    with pytest.raises(accel.UnsupportedModelError) as e:
        accel.patch(model, accel.IdentityConfig())
    msg = str(e.value)
    assert "gpt2" in msg and "llama" in msg and "qwen3" in msg


def test_failed_patch_rolls_back(monkeypatch):
    from accel.patches import core

    model = accel.models.tiny("llama")

    def broken(ctx, cfg, tensors):
        ctx.use_accel_attention()
        raise RuntimeError("boom")

    monkeypatch.setitem(core._APPLIERS, "identity", broken)
    with pytest.raises(RuntimeError, match="boom"):
        accel.patch(model, accel.IdentityConfig())
    assert model.config._attn_implementation == "sdpa" and not accel.is_patched(model)


def test_patch_rejects_unknown_spec_type():
    with pytest.raises(TypeError, match="expects an Artifact"):
        accel.patch(accel.models.tiny("llama"), 42)
