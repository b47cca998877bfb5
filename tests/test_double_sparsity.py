"""Double Sparsity: config, calibration statistics, label cache, selection, runtime on five archs."""
import json

import pytest
import torch
import torch.nn.functional as F

import accel
from accel.artifact import ArtifactError
from accel.calibrate.double_sparsity import (
    block_stats, calibrate_double_sparsity, channel_order, collect_stats, kv_head_scores)
from accel.configs import ConfigError
from accel.configs.double_sparsity import DoubleSparsityConfig
from accel.patches import compat
from accel.patches.ds_cache import DSLabelLayer, dequantize_labels, quantize_labels
from accel.kernels.ds_attention import ds_causal_attention, ds_decode_attention, gather_labels
from accel.patches.kv_press import allowed_from_mask


def _calibrated(model, cfg, n=3, L=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = torch.randint(0, model.config.vocab_size, (n, L), generator=g)
    return calibrate_double_sparsity(model, None, cfg, samples=samples, progress=False)


def _ds_layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, DSLabelLayer)]


# ---- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"budget": 0}, "budget"), ({"budget": -0.5}, "budget"), ({"budget": 2.5}, "whole"),
    ({"budget": float("nan")}, "budget"), ({"heavy_channels": 0}, "heavy_channels"),
    ({"channel_type": "v"}, "channel_type"), ({"group_reduce": "mean"}, "group_reduce"),
    ({"label_bits": 3}, "label_bits"), ({"sink": -1}, "sink"), ({"heavy_channels": 3, "label_bits": 4}, "even"),
], ids=["budget0", "budget-neg", "budget-frac-tokens", "budget-nan", "r0", "bad-type", "bad-reduce", "bits3",
        "sink-neg", "4bit-odd-r"])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DoubleSparsityConfig(**kwargs)


def test_config_budget_and_channels():
    assert DoubleSparsityConfig(budget=1 / 8).budget_tokens(2048) == 256
    assert DoubleSparsityConfig(budget=100).budget_tokens(2048) == 100
    assert DoubleSparsityConfig().channels_for(64) == 16  # d/4 since config version 2
    assert DoubleSparsityConfig(channel_divisor=8).channels_for(64) == 8
    with pytest.raises(ConfigError, match="head_dim"):
        DoubleSparsityConfig(heavy_channels=17).channels_for(16)


# ---- calibration statistics -------------------------------------------------------------------
def test_block_stats_by_hand():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, 3), torch.randn(2, 2, 5, 3)
    s = block_stats(q, k)
    for h in range(4):
        kv = h // 2  # heads 0,1 share KV head 0; heads 2,3 share KV head 1
        for c in range(3):
            exp_q = sum(abs(q[b, h, t, c].item()) for b in range(2) for t in range(5))
            exp_qk = sum(abs(q[b, h, t, c].item() * k[b, kv, t, c].item()) for b in range(2) for t in range(5))
            assert s["q"][h, c].item() == pytest.approx(exp_q, rel=1e-9)
            assert s["qk"][h, c].item() == pytest.approx(exp_qk, rel=1e-9)
    assert s["k"].shape == (2, 3) and s["n"].item() == 10
    comb = kv_head_scores(torch.tensor([[1., 0., 2.], [3., 1., 0.], [0., 5., 0.], [0., 0., 1.]]), 2)
    assert comb.tolist() == [[4., 1., 2.], [0., 5., 1.]]
    assert channel_order(torch.tensor([0.1, 0.9, 0.5])).tolist() == [1, 2, 0]


def test_calibration_accumulates_all_blocks():
    model = accel.models.tiny("llama")
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 512, (1, 32), generator=g), torch.randint(0, 512, (1, 32), generator=g)
    both = collect_stats(model, torch.cat([a, b]), batch_size=1, progress=False)
    sa = collect_stats(model, a, progress=False)
    sb = collect_stats(model, b, progress=False)
    for layer in range(4):
        for kind in ("q", "k", "qk"):
            torch.testing.assert_close(both[layer][kind], (sa[layer][kind] + sb[layer][kind]) / 2)
            assert not torch.allclose(both[layer][kind], sb[layer][kind])
    assert "_accel_attention" not in model.model.layers[0].self_attn.__dict__


def test_artifact_and_sglang_export(tmp_path):
    model = accel.models.tiny("qwen3")
    art = _calibrated(model, DoubleSparsityConfig(heavy_channels=4))
    t = art.tensors_for("double-sparsity")
    assert t["scores_qk"].shape == (4, 4, 16) and t["scores_k"].shape == (4, 2, 16)
    assert t["order_qk"].shape == (4, 2, 16)
    # The KV-head order ranks the summed scores of the group's query heads.
    grp = t["scores_qk"][1, 2] + t["scores_qk"][1, 3]
    assert t["order_qk"][1, 1, 0].item() == int(grp.argmax())
    art.save(tmp_path / "a")
    from accel.cli import main
    assert main(["export", "--format", "sglang-ds", str(tmp_path / "a"), "--output", str(tmp_path / "c.json")]) == 0
    doc = json.loads((tmp_path / "c.json").read_text())
    assert len(doc) == 3 * 4
    assert len(doc["model.layers.2.self_attn.qk_proj"]) == 4 and len(doc["model.layers.2.self_attn.k_proj"]) == 2
    for rows in doc.values():
        for row in rows:
            assert sorted(row) == list(range(16))
    assert doc["model.layers.0.self_attn.q_proj"][3][0] == int(t["scores_q"][0, 3].argmax())


def test_sglang_export_of_hand_built_scores(tmp_path):
    """2 layers, 2 query heads, 1 KV head, head_dim 4: channels by descending score, ties to the
    lower index; the expected JSON is written out by hand."""
    from accel.artifact import Artifact
    from accel.cli import main
    scores = {
        "scores_q": [[[0.1, 0.9, 0.5, 0.3], [2.0, 2.0, 1.0, 3.0]], [[1.0, 1.0, 1.0, 1.0], [-1.0, -2.0, 0.0, -3.0]]],
        "scores_k": [[[0.0, -1.0, 5.0, 5.0]], [[0.5, 0.25, 0.75, 0.0]]],
        "scores_qk": [[[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]], [[0.0, 9.0, 0.0, 8.0], [7.0, 0.0, 6.0, 0.0]]],
    }
    tensors = {f"double-sparsity/{k}": torch.tensor(v) for k, v in scores.items()}
    Artifact(configs=[DoubleSparsityConfig(heavy_channels=2)], tensors=tensors).save(tmp_path / "a")
    assert main(["export", "--format", "sglang-ds", str(tmp_path / "a"), "--output", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text()) == {
        "model.layers.0.self_attn.q_proj": [[1, 2, 3, 0], [3, 0, 1, 2]],
        "model.layers.0.self_attn.k_proj": [[2, 3, 0, 1]],
        "model.layers.0.self_attn.qk_proj": [[0, 1, 2, 3], [3, 2, 1, 0]],
        "model.layers.1.self_attn.q_proj": [[0, 1, 2, 3], [2, 0, 1, 3]],
        "model.layers.1.self_attn.k_proj": [[2, 0, 1, 3]],
        "model.layers.1.self_attn.qk_proj": [[1, 3, 0, 2], [0, 2, 1, 3]],
    }


# ---- label cache -----------------------------------------------------------------------------
def test_label_layer_follows_kv_operations():
    torch.manual_seed(0)
    ch = torch.tensor([[3, 0, 7], [1, 2, 5]])
    layer = DSLabelLayer(ch)
    for n in (5, 1, 1, 3):
        layer.update(torch.randn(3, 2, n, 8), torch.randn(3, 2, n, 8))
        assert torch.equal(layer.labels(), gather_labels(layer.keys, ch))
    layer.crop(-4)
    assert layer.keys.shape[2] == 6 and torch.equal(layer.labels(), gather_labels(layer.keys, ch))
    layer.reorder_cache(torch.tensor([2, 0, 0]))
    assert torch.equal(layer.labels(), gather_labels(layer.keys, ch))
    layer.batch_select_indices(torch.tensor([0, 2]))
    layer.batch_repeat_interleave(2)
    assert layer.keys.shape[0] == 4 and torch.equal(layer.labels(), gather_labels(layer.keys, ch))
    layer.reset()
    assert layer.label_length() == 0


@pytest.mark.parametrize("bits,min_sqnr_db", [(8, 40.0), (4, 18.0)], ids=["8bit", "4bit"])
def test_label_quantization_sqnr_and_bytes(bits, min_sqnr_db):
    torch.manual_seed(42)
    x = torch.randn(2, 3, 63, 8)
    codes, scale, low = quantize_labels(x, bits)
    y = dequantize_labels(codes, scale, low, bits, torch.float32)
    sqnr = 10 * torch.log10(x.pow(2).sum() / (x - y).pow(2).sum())
    assert sqnr > min_sqnr_db
    layer = DSLabelLayer(torch.arange(8).view(1, 8).expand(3, 8), bits=bits)
    layer.update(torch.randn(2, 3, 63, 16), torch.randn(2, 3, 63, 16))
    assert layer.label_bytes() == 2 * 3 * 63 * (8 * bits // 8 + 4)


# ---- selection -------------------------------------------------------------------------------
def _brute_decode(q, k, v, ch, budget, sink, recent, reduce, scale):
    """Loop-by-loop restatement of the selection rule (no padding)."""
    B, H, _, D = q.shape
    KVH, T = k.shape[1], k.shape[2]
    G = H // KVH
    out = torch.zeros(B, H, D)
    s_, r_ = min(sink, budget), min(recent, budget - min(sink, budget))
    for b in range(B):
        for kv in range(KVH):
            sc = torch.stack([torch.stack([(q[b, kv * G + g, 0, ch[kv]] * k[b, kv, t, ch[kv]]).sum()
                                           for t in range(T)]) for g in range(G)])
            sc = sc.max(0).values if reduce == "max" else sc.sum(0)
            forced = set(range(s_)) | set(range(T - r_, T))
            rest = [t for t in sorted(range(T), key=lambda t: -sc[t].item()) if t not in forced]
            sel = sorted(forced | set(rest[:max(0, budget - len(forced))]))
            for g in range(G):
                h = kv * G + g
                w = torch.softmax((k[b, kv, sel] @ q[b, h, 0]) * scale, 0)
                out[b, h] = w @ v[b, kv, sel]
    return out.unsqueeze(2)


@pytest.mark.parametrize("path", ["reference", "cpu"])
@pytest.mark.parametrize("reduce", ["max", "sum"])
@pytest.mark.parametrize("T,budget", [(63, 16), (63, 80), (100, 30)], ids=["T63-b16", "T63-b80", "T100-b30"])
def test_decode_spec_matches_brute_force(T, budget, reduce, path):
    torch.manual_seed(42)
    q, k, v = torch.randn(2, 6, 1, 16), torch.randn(2, 2, T, 16), torch.randn(2, 2, T, 16)
    ch = torch.tensor([[1, 4, 9], [0, 15, 7]])
    got = ds_decode_attention(q, k, v, gather_labels(k, ch), ch, budget, sink=3, recent=5, group_reduce=reduce,
                              path=path)
    exp = _brute_decode(q, k, v, ch, budget, 3, 5, reduce, 16 ** -0.5)
    torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)


def test_decode_spec_left_padding_equals_unpadded():
    torch.manual_seed(42)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    ch = torch.tensor([[1, 2], [3, 4]])
    pad = 7
    kp = torch.cat([torch.randn(1, 2, pad, 16) * 100, k], 2)
    vp = torch.cat([torch.randn(1, 2, pad, 16), v], 2)
    mask = torch.ones(1, 40 + pad, dtype=torch.bool)
    mask[:, :pad] = False
    a = ds_decode_attention(q, k, v, gather_labels(k, ch), ch, 12, sink=2, recent=3, path="reference")
    b = ds_decode_attention(q, kp, vp, gather_labels(kp, ch), ch, 12, sink=2, recent=3, key_mask=mask,
                            path="reference")
    torch.testing.assert_close(a, b)


def test_eval_mode_rows_equal_decode_steps():
    """Evaluation mode (the causal op: row selection + masked SDPA) against decode steps of the
    fast CPU decode path (its own selection and attention): two implementations of one rule."""
    torch.manual_seed(42)
    T = 63
    q, k, v = torch.randn(1, 4, T, 16), torch.randn(1, 2, T, 16), torch.randn(1, 2, T, 16)
    ch = torch.tensor([[1, 2, 5], [3, 4, 6]])
    lab = gather_labels(k, ch)
    allowed = allowed_from_mask(None, 1, T, T, "cpu")
    # A small max_elems forces several row chunks.
    out = ds_causal_attention(q, k, v, lab, ch, 10, 2, 3, 0.25, "max", allowed, max_elems=4 * T * 7)
    for i in range(T):
        exp = ds_decode_attention(q[:, :, i:i + 1], k[:, :, :i + 1], v[:, :, :i + 1], lab[:, :, :i + 1], ch, 10,
                                  sink=2, recent=3, scaling=0.25, path="cpu")
        torch.testing.assert_close(out[:, :, i:i + 1], exp, atol=1e-6, rtol=1e-5, msg=f"row {i}")


# ---- runtime on five architectures ---------------------------------------------------------------
def test_full_budget_generate_is_dense(tiny_model):
    model = tiny_model
    # 16-bit labels: the label cache must equal the gathered keys exactly.
    art = _calibrated(model, DoubleSparsityConfig(budget=1.0, min_context=0, heavy_channels=4, n_dense=1,
                                                  label_bits=16))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 512, (2, 40), generator=g)
    am = torch.ones_like(ids)
    am[1, :6] = 0
    kw = dict(attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    with torch.inference_mode():
        ref = model.generate(ids, **kw)
        with accel.patched(model, art):
            out = model.generate(ids, **kw)
            handlers = [layer.self_attn._accel_attention for layer in compat.decoder_layers(model)
                        if "sparse_decode" in getattr(layer.self_attn.__dict__.get("_accel_attention"), "counts", {})]
            beams = model.generate(ids, attention_mask=am, max_new_tokens=5, num_beams=3, do_sample=False,
                                   pad_token_id=0, return_dict_in_generate=True)
        beams_ref = model.generate(ids, attention_mask=am, max_new_tokens=5, num_beams=3, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert handlers and all(h.counts["sparse_decode"] >= 7 for h in handlers)
    assert torch.equal(beams.sequences, beams_ref)
    ds_layers = _ds_layers(compat.output_cache(beams))
    assert len(ds_layers) == len(handlers)
    for layer in ds_layers:
        ch = [h for h in handlers][0].channels
        assert layer.labels().shape[:3] == layer.keys.shape[:3]
        assert torch.equal(layer.labels(), gather_labels(layer.keys, layer.channels)) and ch.shape[1] == 4


def test_sparse_eval_and_decode_agree(tiny_model):
    """With only the last layer sparse, the last row of a no-cache (evaluation-mode) forward
    equals a real decode step through the label cache, and both differ from dense."""
    model = tiny_model
    cfg = DoubleSparsityConfig(budget=12, min_context=0, heavy_channels=4, n_dense=3, sink=2, recent=3)
    art = _calibrated(model, cfg)
    x = torch.randint(1, 512, (1, 50), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        dense = model(x, use_cache=False).logits[:, -1]
        with accel.patched(model, art):
            ev = model(x, use_cache=False).logits[:, -1]
            cache = compat.output_cache(model(x[:, :-1], use_cache=True))
            dec = model(x[:, -1:], **compat.cache_kwargs(cache), use_cache=True).logits[:, -1]
    torch.testing.assert_close(ev, dec, atol=1e-5, rtol=1e-5)
    assert (ev - dense).abs().max() > 1e-3
    assert not accel.is_patched(model)


def test_crop_keeps_labels_in_step():
    model = accel.models.tiny("llama")
    art = _calibrated(model, DoubleSparsityConfig(budget=8, min_context=0, heavy_channels=4, label_bits=16))
    x = torch.randint(1, 512, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode(), accel.patched(model, art):
        cache = compat.output_cache(model(x[:, :20], use_cache=True))
        model(x[:, 20:21], **compat.cache_kwargs(cache), use_cache=True)
        cache.crop(-5)
        out = model(x[:, 15:16], **compat.cache_kwargs(cache), use_cache=True).logits
        for layer in _ds_layers(cache):
            assert layer.keys.shape[2] == 17
            assert torch.equal(layer.labels(), gather_labels(layer.keys, layer.channels))
    assert torch.isfinite(out).all()


# ---- bad input -------------------------------------------------------------------------------
def test_artifact_of_another_model_is_rejected():
    art = _calibrated(accel.models.tiny("mistral"), DoubleSparsityConfig(heavy_channels=4))
    model = accel.models.tiny("llama")
    with pytest.raises(ArtifactError, match="different model"):
        accel.patch(model, art)
    assert not accel.is_patched(model)


def test_wrong_shape_order_and_r_too_large():
    model = accel.models.tiny("llama")
    art = _calibrated(model, DoubleSparsityConfig(heavy_channels=4))
    art.tensors["double-sparsity/order_qk"] = art.tensors["double-sparsity/order_qk"][:2]
    with pytest.raises(ArtifactError, match="another model"):
        accel.patch(model, art)
    with pytest.raises(ConfigError, match="head_dim"):
        accel.patch(model, DoubleSparsityConfig(heavy_channels=32))
    assert "_accel_attention" not in model.model.layers[3].self_attn.__dict__


def test_unsupported_arch_is_rejected():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(accel.UnsupportedModelError, match="gpt2"):
        calibrate_double_sparsity(model, None, DoubleSparsityConfig(), samples=torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(accel.UnsupportedModelError):
        accel.patch(model, DoubleSparsityConfig())


def test_sweep_json_shape_on_tiny_model(tmp_path):
    from accel.eval.sweep_ds import plot_sweep, run_sweep

    model = accel.models.tiny("qwen2")
    art = _calibrated(model, DoubleSparsityConfig(heavy_channels=4))
    tokens = torch.randint(1, 512, (256,), generator=torch.Generator().manual_seed(0))
    res = run_sweep(model, tokens, art, budgets=[1 / 4, 1], channels=[2, 16], seq_len=64, progress=False)
    t = res["table"]
    assert set(t) == {"dense", "ds", "random", "sink_recent", "oracle"}
    assert set(t["ds"]) == {"1/4,r=2", "1/4,r=16", "1/1,r=2", "1/1,r=16"}
    # Budget 1 is dense for every method; r = head_dim makes DS the oracle.
    for row in t:
        assert t[row]["1/1,r=2"] == pytest.approx(t["dense"]["1/1,r=2"], rel=1e-5)
    assert t["ds"]["1/4,r=16"] == pytest.approx(t["oracle"]["1/4,r=16"], rel=1e-5)
    assert t["sink_recent"]["1/4,r=2"] != pytest.approx(t["dense"]["1/4,r=2"], rel=1e-4)
    png = plot_sweep(res, str(tmp_path / "sweep.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# ---- real model ------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_calibrate_cli_and_sparse_perplexity(smollm2, tmp_path, capsys):
    import dataclasses

    from accel.artifact import Artifact
    from accel.cli import main
    from accel.data import eval_tokens
    from accel.eval.perplexity import perplexity

    out = tmp_path / "ds"
    assert main(["calibrate", "double-sparsity", "--model", "smollm2-135m", "--output", str(out),
                 "--n-samples", "2", "--seq-len", "128", "--heavy-channels", "8", "--json"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["heavy_channels"] == 8 and last["tokens"] == 256
    doc = json.loads((tmp_path / "ds.sglang_ds_channels.json").read_text())
    assert len(doc) == 3 * 30 and len(doc["model.layers.29.self_attn.k_proj"]) == 3
    art = Artifact.load(out)
    model, tok = smollm2
    tokens = eval_tokens(tok, "wiki", 1024)
    dense = perplexity(model, tokens, seq_len=512, progress=False).ppl
    cfg = dataclasses.replace(art.configs[0], budget=1 / 8, min_context=0)
    ppl = {}
    for name, c in {"ds": cfg, "sink_recent": dataclasses.replace(cfg, recent=4096)}.items():
        with accel.patched(model, Artifact(configs=[c], tensors=art.tensors, fingerprint=art.fingerprint)):
            ppl[name] = perplexity(model, tokens, seq_len=512, progress=False).ppl
    assert not accel.is_patched(model)
    # Sparse attention is measured (ppl moves), and calibrated channels beat sink + recent.
    assert dense < ppl["ds"] < ppl["sink_recent"]
    assert ppl["ds"] < 1.15 * dense


@pytest.mark.parametrize("bits", [8, 4], ids=["8bit", "4bit"])
def test_quantized_labels_in_decode_and_eval(bits):
    model = accel.models.tiny("llama")
    cfg = DoubleSparsityConfig(budget=12, min_context=0, heavy_channels=4, n_dense=3, sink=2, recent=3, label_bits=bits)
    art = _calibrated(model, cfg)
    x = torch.randint(1, 512, (1, 50), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode(), accel.patched(model, art):
        ev = model(x, use_cache=False).logits[:, -1]
        cache = compat.output_cache(model(x[:, :-1], use_cache=True))
        dec = model(x[:, -1:], **compat.cache_kwargs(cache), use_cache=True).logits[:, -1]
        (layer,) = _ds_layers(cache)
    torch.testing.assert_close(ev, dec, atol=1e-5, rtol=1e-5)
    assert layer.label_bytes() == 50 * 2 * (4 * bits // 8 + 4)


def test_retrieval_cli_overrides_heavy_channels():
    import argparse

    from accel.artifact import Artifact
    from accel.eval.ds_cli import _base_config

    art = Artifact(configs=[DoubleSparsityConfig(heavy_channels=8, recent=32)], tensors={})
    args = argparse.Namespace(heavy_channels=16, recent=None, sink=None)
    cfg = _base_config(art, args)
    assert cfg.heavy_channels == 16 and cfg.recent == 32
