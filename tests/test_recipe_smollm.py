"""A recipe on the real SmolLM2 (slow): Double Sparsity + Wanda 2:4 from a tiny calibration,
one artifact that patches whole; the composed model differs from each part alone."""
import math

import pytest
import torch

import accel
from accel.configs.double_sparsity import DoubleSparsityConfig
from accel.configs.prune import PruneConfig

pytestmark = pytest.mark.slow


def test_ds_plus_wanda_24_on_smollm2(tmp_path):
    from accel.data import eval_tokens
    from accel.eval.perplexity import perplexity

    model, tok = accel.models.load("smollm2-135m")
    recipe = accel.Recipe([DoubleSparsityConfig(budget=1 / 8), PruneConfig(pattern="2:4")])
    art = accel.calibrate(model, recipe, tokenizer=tok, num_calibration_samples=2, max_seq_length=64,
                          output=tmp_path / "art", progress=False)
    assert not accel.is_patched(model)
    ids = eval_tokens(tok, "wiki", 256)
    loaded = accel.Artifact.load(tmp_path / "art")
    with accel.patched(model, loaded):
        rows = accel.report(model).by_method()
        both = perplexity(model, ids, seq_len=256, progress=False).ppl
        with torch.no_grad():
            logits = {"both": model(ids[None, :128], use_cache=False).logits}
    assert rows["prune"] == 210 and rows["double-sparsity"] >= 28  # 30 layers, 2 dense
    assert math.isfinite(both) and both < 1e4
    for c in art.configs:
        with accel.patched(model, accel.Artifact(configs=[c], tensors=art.tensors, fingerprint=art.fingerprint)):
            with torch.no_grad():
                logits[c.method] = model(ids[None, :128], use_cache=False).logits
    assert not accel.is_patched(model)
    # Each part changes the model, and the two together differ from either alone.
    assert not torch.equal(logits["both"], logits["prune"])
    assert not torch.equal(logits["both"], logits["double-sparsity"])
