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


def test_import_does_not_add_methods_to_transformers():
    """`import accel` leaves PreTrainedModel alone; model.patch exists only after the explicit call."""
    import subprocess
    import sys

    code = ("import accel, transformers as t; a = hasattr(t.PreTrainedModel, 'patch'); "
            "accel.install_model_methods(); print(a, hasattr(t.PreTrainedModel, 'patch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]


def test_model_patch_method_and_context_manager():
    model = accel.models.tiny("llama")
    accel.install_model_methods()
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


# ---- the KV-cache press base (patches/kv_press.py) ------------------------------------------------
def _toy_press():
    """A press through the base only: a config, an applier calling install_press, a handler."""
    from dataclasses import dataclass
    from typing import ClassVar

    from accel.configs import MethodConfig, register_config
    from accel.patches import compat, register_method
    from accel.patches.kv_press import PressHandler, install_press

    class TaggedLayer(compat.DynamicLayer):
        pass

    class Recorder(PressHandler):
        kernel_path = "toy"
        seen: ClassVar[list] = []

        def upgrade_layer(self, layer):
            self.seen.append(("upgrade", self.layer_idx))
            new = TaggedLayer()
            new.__dict__.update(layer.__dict__)
            return new

        def with_cache(self, module, query, key, value, attention_mask, layer, **kwargs):
            self.seen.append(("cache", self.layer_idx, type(layer).__name__, query.shape[2]))
            return super().with_cache(module, query, key, value, attention_mask, layer, **kwargs)

        def without_cache(self, module, query, key, value, attention_mask, **kwargs):
            self.seen.append(("no-cache", self.layer_idx))
            return super().without_cache(module, query, key, value, attention_mask, **kwargs)

    @register_config
    @dataclass
    class ToyPressConfig(MethodConfig):
        method: ClassVar[str] = "test-toy-press"

    @register_method("test-toy-press", claims=("attention",))
    def apply(ctx, cfg, tensors):
        install_press(ctx, lambda i, attn: Recorder(i), skip=lambda i, attn: "first" if i == 0 else None,
                      detail="toy")

    return ToyPressConfig, Recorder


def test_kv_press_base_hooks_and_exactness():
    from accel.patches import compat
    from accel.patches.kv_press import CACHE_ATTR

    cfg_cls, rec = _toy_press()
    model = accel.models.tiny("llama")
    x = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        ref = model(input_ids=x, use_cache=False).logits
        ref_out = model(input_ids=x, use_cache=True)
        ref_next = model(input_ids=x[:, -1:], **compat.cache_kwargs(compat.output_cache(ref_out))).logits
    L = model.config.num_hidden_layers
    with accel.patched(model, cfg_cls()):
        rows = {r["module"]: r for r in accel.report(model).rows}
        assert rows["model.layers.0.self_attn"]["detail"] == "dense (first)"
        assert rows["model.layers.1.self_attn"]["kernel"] == "toy"
        with torch.no_grad():
            assert torch.equal(model(input_ids=x, use_cache=False).logits, ref)  # default hooks: dense
        assert rec.seen == [("no-cache", i) for i in range(1, L)]
        rec.seen.clear()
        with torch.no_grad():
            out = model(input_ids=x, use_cache=True)
            cache = compat.output_cache(out)
            nxt = model(input_ids=x[:, -1:], **compat.cache_kwargs(cache)).logits
        assert torch.equal(nxt, ref_next)
        # Each pressed layer's plain DynamicLayer is upgraded once, on first use; layer 0 is left alone.
        assert [s for s in rec.seen if s[0] == "upgrade"] == [("upgrade", i) for i in range(1, L)]
        assert [s[1:] for s in rec.seen if s[0] == "cache"] == (
            [(i, "TaggedLayer", 9) for i in range(1, L)] + [(i, "TaggedLayer", 1) for i in range(1, L)])
        assert type(cache.layers[0]) is compat.DynamicLayer and type(cache.layers[1]).__name__ == "TaggedLayer"
        assert not any(CACHE_ATTR in layer.self_attn.__dict__ for layer in model.model.layers)
    assert not accel.is_patched(model)
    assert all(not layer.self_attn._forward_pre_hooks for layer in model.model.layers)
