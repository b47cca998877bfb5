"""eval/claims_qwen.py runs end to end (on a tiny Qwen2 stand-in with SmolLM2's tokenizer) and
reports both corpora for each row, the budget and the claim."""
import pytest
import torch
from transformers import AutoTokenizer

import accel


@pytest.mark.slow
def test_claims_qwen_runs_on_a_tiny_stand_in(monkeypatch):
    from accel.eval import claims_qwen

    tok = AutoTokenizer.from_pretrained(accel.models.resolve("smollm2-135m"))
    model = accel.models.tiny("qwen2", vocab_size=len(tok))
    asked = []
    monkeypatch.setattr(accel.models, "load", lambda name, dtype=None: asked.append(name) or (model, tok))
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    res = claims_qwen.run(n_samples=2, calib_seq_len=32, tokens=256, seq_len=64, progress=False)
    assert asked == ["qwen2.5-0.5b"]
    assert set(res["rows"]) == {"dense", "wanda 0.6", "wanda+dsnot 0.6"}
    assert all(set(r["ppl"]) == {"wiki", "shakespeare"} for r in res["rows"].values())
    assert res["rows"]["wanda 0.6"]["ppl"] != res["rows"]["dense"]["ppl"]
    assert res["calibration"]["budget"].startswith("2 x 32")
    assert set(res["claim"]["wanda+dsnot beats wanda"]) == {"wiki", "shakespeare"}
    # The model ends with its dense weights (in bf16).
    assert all(torch.equal(v, dense[k].to(v.dtype)) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_claims_qwen_unguarded_row(monkeypatch):
    from accel.eval import claims_qwen

    tok = AutoTokenizer.from_pretrained(accel.models.resolve("smollm2-135m"))
    model = accel.models.tiny("qwen2", vocab_size=len(tok))
    monkeypatch.setattr(accel.models, "load", lambda name, dtype=None: (model, tok))
    res = claims_qwen.run(n_samples=2, calib_seq_len=32, tokens=256, seq_len=64, progress=False,
                          rows=("wanda", "wanda+dsnot-noguard"))
    assert set(res["rows"]) == {"wanda 0.6", "wanda+dsnot-noguard 0.6"}
    assert set(res["claim"]) == {"wanda+dsnot-noguard beats wanda"}


def test_claims_qwen_unknown_row():
    from accel.eval import claims_qwen

    with pytest.raises(ValueError, match="unknown row 'dsnot'"):
        claims_qwen.run(rows=("dense", "dsnot"))
