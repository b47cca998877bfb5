"""SmolLM2 accel checkpoints (slow: the real model).

- DS + GQSA composed, fp32: the reloaded model's logits (prefill and decode) equal the patched
  model's bit for bit, and `accel.report` is the same.
- GQSA W4S50 g16, bf16 (eval/bench_hf_load.py): the GQSA linears take <= 0.25x their bf16 bytes on
  disk; the whole checkpoint is the bf16 embedding (tied, kept dense) plus those; loading it in
  a fresh process grows the peak RSS by <= 1.3x the checkpoint's size (no dense detour: the
  dense linears alone would be 2.2x).
"""
import pytest
import torch
from _hf_ckpt import BUILDERS, merged
from transformers import AutoModelForCausalLM

import accel
from accel.eval import bench_hf_load

pytestmark = pytest.mark.slow


def test_smollm2_ds_gqsa_round_trip_bit_exact(smollm2, tmp_path):
    from test_hf_checkpoint import _run

    model, tok = smollm2
    ids = tok("The capital of France is a city that", return_tensors="pt").input_ids.repeat(1, 3)
    art = merged(BUILDERS["double-sparsity"](model), BUILDERS["gqsa"](model))
    with accel.patched(model, art):
        ref, rows = _run(model, ids), accel.report(model).rows
        accel.save_pretrained(model, tmp_path / "ck", tokenizer=tok)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    for a, b in zip(ref, _run(loaded, ids)):
        assert torch.equal(a, b)
    assert accel.report(loaded).rows == rows
    assert (tmp_path / "ck" / "tokenizer.json").is_file()


def test_smollm2_gqsa_size_and_load_memory(tmp_path):
    r = bench_hf_load.run(tmp_path)
    assert r["patched"]
    assert r["linears_ratio"] <= 0.25                      # measured 0.19
    embed = r["bf16_bytes"] - r["bf16_linears_bytes"]      # embedding + norms, dense bf16 in both
    assert r["accel_bytes"] <= embed + 0.25 * r["bf16_linears_bytes"]
    assert r["load_peak_rss_growth"] <= 1.3 * r["accel_bytes"]   # measured 0.71x
