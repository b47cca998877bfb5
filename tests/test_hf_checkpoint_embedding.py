"""GQSA's embedding_bits option: the input embedding as packed rows gathered and dequantized per
token, the lm_head a dense (S0) GQSA linear sharing the embedding's tensors when tied; patched
at patch time, so the saved checkpoint reloads as the same model (bit-exact, CPU fp32)."""
import json

import pytest
import torch
from _hf_ckpt import gqsa_art
from safetensors import safe_open
from test_hf_checkpoint import IDS, _run
from transformers import AutoModelForCausalLM

import accel
from accel import ArtifactError
from accel.configs import ConfigError, config_from_dict
from accel.configs.gqsa import GQSAConfig
from accel.kernels.gqsa_linear import cpp_ext
from accel.patches.gqsa import GQSALinear
from accel.patches.gqsa_embedding import GQSAEmbedding


def _emb_art(model, bits=4, g=32):
    return gqsa_art(model, embedding_bits=bits, embedding_group_size=g)


@pytest.mark.parametrize("bits,g", [(4, 32), (8, 16), (4, 64)])
def test_embedding_rows_are_the_round_to_nearest_table(bits, g):
    """Each gathered row is within half a quantization step of the original row (per group:
    (max - min) / (2^bits - 1) / 2, plus fp16 rounding of scale and zero)."""
    torch.manual_seed(42)
    model = accel.models.tiny("llama", vocab_size=1000)
    w = model.get_input_embeddings().weight.detach().clone()
    accel.patch(model, _emb_art(model, bits, g))
    emb = model.get_input_embeddings()
    assert isinstance(emb, GQSAEmbedding) and not hasattr(emb, "weight")
    ids = torch.randint(0, 1000, (3, 63))
    got = emb(ids)
    assert got.shape == (3, 63, 64) and got.dtype == torch.float32
    wg = w[ids].view(3, 63, -1, g)
    step = (wg.amax(-1) - wg.amin(-1)) / (2 ** bits - 1)
    err = (got.view(3, 63, -1, g) - wg).abs().amax(-1)
    assert bool((err <= 0.5 * step * 1.01 + 1e-3 * wg.abs().amax(-1) + 1e-6).all())


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_bit_exact(arch, tied, tmp_path):
    model = accel.models.tiny(arch, tie_word_embeddings=tied)
    dense = model(IDS).logits
    accel.patch(model, _emb_art(model))
    head = model.get_output_embeddings()
    assert isinstance(head, GQSALinear)
    emb = model.get_input_embeddings()
    # Tied: the lm_head reads the embedding's packed codes (one copy).
    assert (head.qweight.data_ptr() == emb.qweight.data_ptr()) == tied
    ref, rows = _run(model, IDS), accel.report(model).rows
    assert 0 < (ref[0] - dense).abs().max() < 3
    accel.save_pretrained(model, tmp_path / "ck")
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["model.embed_tokens.weight"] == (0,) and "model.embed_tokens.qweight" in shapes
    assert ("lm_head.qweight" in shapes) != tied
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert isinstance(loaded.get_input_embeddings(), GQSAEmbedding)
    for a, b in zip(ref, _run(loaded, IDS)):
        assert torch.equal(a, b)
    assert accel.report(loaded).rows == rows
    lh = loaded.get_output_embeddings()
    assert (lh.qweight.data_ptr() == loaded.get_input_embeddings().qweight.data_ptr()) == tied
    # The fingerprint still names the dense model (artifacts made on it stack on the loaded one).
    dense_fp = accel.artifact.fingerprint(accel.models.tiny(arch, tie_word_embeddings=tied))
    assert accel.artifact.fingerprint(loaded) == dense_fp
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]["fingerprint"] == dense_fp
    assert not any(b.is_meta for b in loaded.buffers())


def test_lm_head_kernel_paths():
    """int4 g32: the native AVX-512 kernel (where it builds); int8: the dequantizing reference."""
    for bits, path in ((4, "cpu-avx512" if cpp_ext.available() else "cpu-dequant"), (8, "cpu-dequant")):
        model = accel.models.tiny("llama")
        accel.patch(model, _emb_art(model, bits))
        assert model.lm_head.kernel_path == path


def test_config_version_and_validation():
    d = GQSAConfig().to_dict()
    assert d["version"] == 4 and d["params"]["embedding_bits"] is None
    old = {**d, "version": 3, "params": {k: v for k, v in d["params"].items()
                                         if k not in ("embedding_bits", "embedding_group_size")}}
    assert config_from_dict(old).embedding_bits is None
    with pytest.raises(ConfigError, match="embedding_bits=3"):
        GQSAConfig(embedding_bits=3)
    with pytest.raises(ConfigError, match="embedding_group_size=0"):
        GQSAConfig(embedding_bits=4, embedding_group_size=0)


def test_bad_group_size_and_missing_tensors_are_named():
    model = accel.models.tiny("llama")
    with pytest.raises(ArtifactError, match="embedding_group_size=24 does not divide the hidden size 64"):
        _emb_art(model, 4, 24)
    art = gqsa_art(model)
    art.configs = [GQSAConfig(**{**art.configs[0].to_dict()["params"], "embedding_bits": 4})]
    with pytest.raises(ArtifactError, match="no packed tensors for the input embedding model.embed_tokens"):
        accel.patch(model, art)
    assert not accel.is_patched(model)
