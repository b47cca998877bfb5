"""Double Sparsity-Offload: slow-tier stores, equivalence with in-memory DS, prediction, bad input."""
import errno
import gc
import os

import pytest
import torch

import accel
import accel.data
from accel.configs import ConfigError
from accel.configs.double_sparsity import DoubleSparsityConfig
from accel.offload import store as store_mod
from accel.offload.store import DiskStore, HostStore, OffloadError
from accel.patches import compat
from accel.patches.ds_offload import FLUSH_TOKENS, offload_stats
from accel.patches.ds_offload_cache import OffloadedDSLayer

BASE = dict(budget=24, sink=2, recent=8, n_dense=1, min_context=16)


def _order(model, seed=0):
    tc = compat.text_config(model.config)
    L, KVH = tc.num_hidden_layers, tc.num_key_value_heads
    D = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.stack([torch.randperm(D, generator=g) for _ in range(KVH)]) for _ in range(L)])


def _artifact(model, **kw):
    cfg = DoubleSparsityConfig(**{**BASE, **kw})
    return accel.Artifact.for_model(model, [cfg], tensors={"double-sparsity/order_qk": _order(model)})


def _prompt(batch, T=100, vocab=512, seed=1):
    ids = torch.randint(0, vocab, (batch, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :13] = 0  # left padding on the second row
    return ids, mask


def _generate(model, art, ids, mask, new=12):
    with accel.patched(model, art):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        stats = offload_stats(model)
    setattr(out, compat.CACHE_KWARG, None)
    return out.sequences, torch.stack(out.logits), stats


# ---- stores -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["host", "disk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_store_append_gather_read(kind, dtype, tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "GATHER_BATCH", 7)  # several gather batches
    rows_per_token, E = 6, 10
    st = (HostStore(rows_per_token, E, dtype, chunk_tokens=7) if kind == "host"
          else DiskStore(str(tmp_path), "x.kv", rows_per_token, E, dtype, chunk_tokens=7))
    torch.manual_seed(42)
    full = torch.randn(63, rows_per_token, E).to(dtype)
    for a, b in [(0, 5), (5, 6), (6, 40), (40, 63)]:  # crosses several chunk boundaries
        st.append(full[a:b])
    assert st.tokens == 63 and st.nbytes == full.numel() * full.element_size()
    rows = torch.randint(0, 63 * rows_per_token, (50,)).sort().values
    assert torch.equal(st.gather(rows), full.reshape(-1, E)[rows])
    assert torch.equal(st.read(10, 20), full[10:20])
    with pytest.raises(ValueError, match="expects"):
        st.append(full[:2, :3])
    st.close()
    if kind == "disk":
        assert not os.path.exists(tmp_path / "x.kv")


# ---- equivalence with in-memory DS --------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 2], ids=["b1", "b2-padded"])
def test_offload_matches_in_memory_ds(tiny_model, batch, tmp_path):
    ids, mask = _prompt(batch)
    ref_seq, ref_logits, _ = _generate(tiny_model, _artifact(tiny_model), ids, mask)
    for kind in ("cpu", "disk"):
        kw = {"offload": kind} | ({"offload_dir": str(tmp_path)} if kind == "disk" else {})
        seq, logits, st = _generate(tiny_model, _artifact(tiny_model, **kw), ids, mask)
        assert torch.equal(seq, ref_seq), kind
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
        # Everything but the device tail went to the slow tier; the tail stays bounded.
        assert st["slow_bytes"] > 0 and st["decode_tokens"] == 11
        assert st["slow_bytes"] < st["dense_kv_bytes"]
    gc.collect()  # layers and their session reference each other
    assert os.listdir(tmp_path) == []  # the cache's files are gone with the cache


@pytest.mark.parametrize("bits", [8, 4])
def test_offload_quantized_labels_match(bits, tmp_path):
    model = accel.models.tiny("qwen3")
    ids, mask = _prompt(2)
    ref_seq, ref_logits, _ = _generate(model, _artifact(model, label_bits=bits), ids, mask)
    seq, logits, st = _generate(model, _artifact(model, label_bits=bits, offload="disk",
                                                 offload_dir=str(tmp_path)), ids, mask)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_device_tail_bounded_and_moved_bytes_sparse(tmp_path):
    model = accel.models.tiny("llama")
    ids, mask = _prompt(1, T=400)
    with accel.patched(model, _artifact(model, offload="disk", offload_dir=str(tmp_path))):
        cache = compat.DynamicCache(config=model.config)
        model(ids, attention_mask=mask, **compat.cache_kwargs(cache))
        tok = ids[:, -1:]
        for _ in range(FLUSH_TOKENS + 5):  # at least one flush of the tail during decode
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
            tok = model(tok, attention_mask=mask, **compat.cache_kwargs(cache)).logits[:, -1:].argmax(-1)
        layers = [lay for lay in cache.layers if isinstance(lay, OffloadedDSLayer)]
        assert len(layers) == 4
        for lay in layers:
            assert lay.keys.shape[2] <= 8 + FLUSH_TOKENS and lay.n_slow + lay.keys.shape[2] == lay.length
        st = offload_stats(model)
        rep = str(accel.report(model))
        assert "offload-disk" in rep and "KiB/token" in rep and "slow tier" in rep
    # Sparse layers fetch <= budget (24) of ~470 tokens; the one dense layer reads all of its K/V.
    per_layer_dense = st["dense_kv_bytes"] / 4
    assert st["moved_bytes_per_token"] < per_layer_dense * (1 + 3 * 24 / 400)
    assert st["moved_bytes_per_token"] > per_layer_dense * 0.9


# ---- prediction ---------------------------------------------------------------------------------
def _residual_free(model):
    """Every layer sees the embeddings: zero attention/MLP outputs, equal input norms."""
    with torch.no_grad():
        for layer in compat.decoder_layers(model):
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
            layer.input_layernorm.weight.copy_(compat.decoder_layers(model)[0].input_layernorm.weight)
    return model


def test_prediction_hit_rate_exact_when_hidden_states_match(tmp_path):
    ids, mask = _prompt(2)
    model = accel.models.tiny("llama")
    _, _, st = _generate(model, _artifact(model, offload="disk", offload_select="predicted",
                                          offload_dir=str(tmp_path)), ids, mask)
    assert st["hit_total"] > 0 and st["hit_rate"] < 0.99  # a random model: layers disagree
    model = _residual_free(accel.models.tiny("llama"))
    seq_e, log_e, _ = _generate(model, _artifact(model, offload="cpu"), ids, mask)
    seq_p, log_p, st = _generate(model, _artifact(model, offload="cpu", offload_select="predicted"), ids, mask)
    assert st["hit_total"] > 0 and st["hit_rate"] == 1.0
    assert torch.equal(seq_p, seq_e)
    torch.testing.assert_close(log_p, log_e)


# ---- bad input ----------------------------------------------------------------------------------
def test_config_rejects_bad_offload():
    with pytest.raises(ConfigError, match="offload must be"):
        DoubleSparsityConfig(offload="gpu")
    with pytest.raises(ConfigError, match="offload_select"):
        DoubleSparsityConfig(offload="disk", offload_select="guess")
    with pytest.raises(ConfigError, match="only used with offload='disk'"):
        DoubleSparsityConfig(offload="cpu", offload_dir="/tmp")


def test_unwritable_offload_dir_fails_at_patch(tmp_path):
    model = accel.models.tiny("llama")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OffloadError, match="a_file"):
        accel.patch(model, _artifact(model, offload="disk", offload_dir=str(blocker / "kv")))
    assert not accel.is_patched(model)


# ---- security: placement is the user's choice, not the artifact's ---------------------------------
def test_artifact_from_disk_does_not_choose_where_accel_writes(tmp_path, caplog):
    import logging

    model = accel.models.tiny("llama")
    evil = tmp_path / "evil"
    evil.mkdir()
    path = _artifact(model, offload="disk", offload_dir=str(evil)).save(tmp_path / "art")
    ids, mask = _prompt(1)
    ref_seq, ref_logits, _ = _generate(model, _artifact(model), ids, mask)  # in-memory DS
    with caplog.at_level(logging.INFO, logger="accel.patches.core"):
        seq, lg, stats = _generate(model, str(path), ids, mask)
    assert list(evil.iterdir()) == [], "a patched forward wrote where the artifact said"
    assert stats is None and "runtime choice" in caplog.text
    assert torch.equal(seq, ref_seq) and torch.equal(lg, ref_logits)
    # An Artifact object read from disk is the same artifact: its placement is ignored as well.
    seq, _, stats = _generate(model, accel.Artifact.load(path), ids, mask)
    assert stats is None and list(evil.iterdir()) == []
    # The user chooses the placement when patching.
    mine = tmp_path / "mine"
    mine.mkdir()
    with accel.patched(model, str(path), offload="disk", offload_dir=str(mine)):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
        assert offload_stats(model)["kind"] == "disk"
        assert any(f.suffix == ".kv" for f in mine.rglob("*"))
        del out
        gc.collect()
    assert list(evil.iterdir()) == []
    assert torch.equal(_generate(model, str(path), ids, mask)[0], ref_seq)


def _step_run(model, tmp_path, n_steps, break_at, breaker):
    """Prefill + decode steps by hand; `breaker()` runs before step `break_at`. Returns the logits
    produced before the failure (cloned when made) and the raised error."""
    ids, mask = _prompt(1, T=200)
    outs, err = [], None
    with accel.patched(model, _artifact(model, offload="disk", offload_dir=str(tmp_path))):
        cache = compat.DynamicCache(config=model.config)
        logits = model(ids, attention_mask=mask, **compat.cache_kwargs(cache)).logits[:, -1]
        outs.append(logits)
        kept = [o.clone() for o in outs]
        for step in range(n_steps):
            if step == break_at:
                breaker()
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
            try:
                logits = model(outs[-1].argmax(-1, keepdim=True), attention_mask=mask, **compat.cache_kwargs(cache)).logits[:, -1]
            except OffloadError as e:
                err = e
                break
            outs.append(logits)
            kept.append(logits.clone())
        if err is not None:  # the cache refuses to go on after the failure
            with pytest.raises(OffloadError, match="unusable after an earlier error"):
                model(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), **compat.cache_kwargs(cache))
    for a, b in zip(outs, kept):
        assert torch.equal(a, b)  # earlier outputs untouched
    return outs, err


def test_disk_full_gives_clear_error(tmp_path, monkeypatch):
    model = accel.models.tiny("llama")

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    outs, err = _step_run(model, tmp_path, FLUSH_TOKENS + 4, 2, lambda: monkeypatch.setattr(store_mod, "_write_at", full))
    assert err is not None and "No space left" in str(err) and "layer" in str(err)
    assert 2 < len(outs) <= FLUSH_TOKENS + 4


def test_cache_refuses_use_after_unpatch():
    model = accel.models.tiny("llama")
    ids, mask = _prompt(1)
    with accel.patched(model, _artifact(model, offload="cpu")):
        cache = compat.DynamicCache(config=model.config)
        model(ids, attention_mask=mask, **compat.cache_kwargs(cache))
    with pytest.raises(OffloadError, match="unpatched"):
        model(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), **compat.cache_kwargs(cache))


def test_disk_full_while_growing_file(tmp_path, monkeypatch):
    st = DiskStore(str(tmp_path), "g.kv", 2, 8, torch.float32, chunk_tokens=4)
    st.append(torch.zeros(3, 2, 8))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OffloadError, match="disk full"):
        st.append(torch.ones(5, 2, 8))  # needs a new chunk
    assert st.tokens == 3 and torch.equal(st.read(0, 3), torch.zeros(3, 2, 8))  # earlier rows intact


def test_removed_slow_tier_file_gives_clear_error(tmp_path):
    model = accel.models.tiny("llama")

    def remove():
        (d,) = [p for p in tmp_path.iterdir() if p.name.startswith("accel-ds-offload-")]
        os.remove(d / "layer002.kv")

    outs, err = _step_run(model, tmp_path, 5, 3, remove)
    assert err is not None and "layer002.kv" in str(err) and "removed" in str(err)
    assert len(outs) == 4


def test_bench_synthetic_run_small():
    from accel.eval.bench_ds_offload import synthetic_run
    res, toks, logits = synthetic_run(1024, 2, 16, None)
    assert res["tokens_equal"] and res["max_logit_diff"] < 1e-3 and len(toks) == 2
    assert 0 < res["moved_bytes_ratio"] < 0.2 and 0 < res["device_bytes_ratio"] < 1
    assert res["slow_mb"] > 0.9 * res["dense_kv_mb"]


# ---- CUDA side-stream prefetch (the only test that skips here: it needs a GPU) -----------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (side-stream double buffering)")
def test_cuda_prefetcher_round_trip():
    from accel.offload.prefetch import CudaPrefetcher
    torch.manual_seed(42)
    st = HostStore(4, 16, torch.float16, pin=True)
    full = torch.randn(300, 4, 16).half()
    st.append(full)
    pf = CudaPrefetcher("cuda")
    for i in range(6):  # both slots, reused several times, growing buffers
        rows = torch.randint(0, 1200, (50 + 40 * i,)).sort().values
        h = pf.submit(st, rows)
        torch.cuda._sleep(1_000_000)  # keep the compute stream busy while the copy runs
        got = pf.take(h).clone()
        pf.release(h)
        assert torch.equal(got.cpu(), full.reshape(-1, 16)[rows])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned host tier + prefetch)")
def test_cuda_offload_cpu_matches_in_memory_ds():
    model = accel.models.tiny("qwen3").cuda()
    ids, mask = (t.cuda() for t in _prompt(2))
    ref_seq, ref_logits, _ = _generate(model, _artifact(model), ids, mask)
    for sel in ("exact", "predicted"):
        seq, logits, st = _generate(model, _artifact(model, offload="cpu", offload_select=sel), ids, mask)
        if sel == "exact":
            assert torch.equal(seq, ref_seq)
            torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
        assert st["decode_tokens"] == 11 and st["moved_bytes_total"] > 0


# ---- SmolLM2 ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_offload_disk_matches_in_memory_ds(smollm2, tmp_path):
    model, tok = smollm2
    text = accel.data.eval_tokens(tok, "wiki", 700)
    ids = torch.stack([text[:600], text[100:700]])
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    kw = dict(budget=64, sink=4, recent=16, n_dense=2, min_context=256)
    ref_seq, ref_logits, _ = _generate(model, _artifact(model, **kw), ids, mask, new=6)
    seq, logits, st = _generate(model, _artifact(model, offload="disk", offload_dir=str(tmp_path), **kw), ids, mask,
                                new=6)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-3, atol=1e-3)
    assert st["layers"] == 30 and st["slow_bytes"] > 0
