"""Passkey retrieval over natural prose (eval/ds_retrieval.py) and Double Sparsity's defaults
(r = head_dim / 4, 8-bit labels since config version 2; version-1 artifacts keep d/8 and 16 bits)."""
import json
import random
import re

import pytest
import torch

import accel
from accel.configs.double_sparsity import DoubleSparsityConfig


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(accel.models.smollm2_dir())


def _hay(p):
    """The prompt's haystack before and after the needle."""
    body = p.text.split("I will quiz you about the pass key.\n\n", 1)[1].rsplit("\n\nNow, what is the pass key", 1)[0]
    before, after = body.split(f"\n\nThe pass key is {p.answer}. Remember it. {p.answer} is the pass key.\n\n")
    return before, after


@pytest.mark.parametrize("context", [1000, 2048])
def test_prose_prompt_has_key_once_right_length_and_prose(tok, context):
    from accel.data import texts
    from accel.eval.ds_retrieval import make_prompts

    prompts = make_prompts(tok, "passkey", [context], 3, seed=1, haystack="prose")
    corpus = "\n".join(texts("wiki", "evaluation"))
    for p in prompts:
        n = len(tok(p.text).input_ids)
        assert context * 0.97 <= n <= context, n
        # The needle once; the key nowhere else.
        assert p.text.count(f"The pass key is {p.answer}.") == 1 and p.text.count(p.answer) == 2
        before, after = _hay(p)
        assert "grass is green" not in p.text
        # Whole sentences of evaluation articles on both sides, the needle at a sentence boundary.
        for side in (before.strip(), after.strip()):
            sents = re.split(r"(?<=[.!?]) ", side)
            assert len(sents) > 3
            for s in (sents[0], sents[len(sents) // 2], sents[-1]):
                assert s in corpus, s
        assert before.rstrip()[-1] in ".!?" and (after[0].isupper() or after[0].isdigit() or after[0] in "\"'(")
        depth = len(tok(before).input_ids) / (len(tok(before).input_ids) + len(tok(after).input_ids))
        assert 0.07 <= depth <= 0.93, depth
    # A different text for every prompt.
    assert len({_hay(p)[0][:200] for p in prompts}) == len(prompts)


def test_filler_prompts_unchanged_by_the_prose_option(tok):
    from accel.eval.ds_retrieval import make_prompts

    a = make_prompts(tok, "passkey", [512], 2, seed=0)
    b = make_prompts(tok, "passkey", [512], 2, seed=0, haystack="filler")
    assert [p.text for p in a] == [p.text for p in b] and "The grass is green." in a[0].text
    with pytest.raises(ValueError, match="haystack"):
        make_prompts(tok, "passkey", [512], 1, haystack="poetry")


class _BosTok:
    """SmolLM2's tokenizer made to put a BOS token before every text, as Gemma's does."""

    def __init__(self, tok):
        self.tok, self.bos_token_id = tok, tok.convert_tokens_to_ids("<|endoftext|>")

    def __call__(self, text, add_special_tokens=True, **kw):
        out = self.tok(text, add_special_tokens=False, **kw)
        if add_special_tokens:
            out["input_ids"] = [self.bos_token_id] + list(out["input_ids"])
        return out


@pytest.mark.parametrize("haystack", ["filler", "prose"])
def test_prompt_with_bos_never_exceeds_context(tok, haystack):
    """A tokenizer that adds BOS (Gemma's): the prompt, BOS included, stays within the context
    (the filler prompt did not count the BOS)."""
    from accel.data import bos_token_id
    from accel.eval.ds_retrieval import make_prompts

    btok = _BosTok(tok)
    assert bos_token_id(btok) == btok.bos_token_id
    for context in (700, 1000, 2048):
        for p in make_prompts(btok, "passkey", [context], 4, seed=3, haystack=haystack):
            n = len(btok(p.text).input_ids)
            assert 0.95 * context <= n <= context, (context, n)


@pytest.mark.parametrize("haystack", ["filler", "prose"])
def test_prompt_is_the_usual_passkey_format(tok, haystack):
    """Landmark/LongLoRA wording; the needle and the question each a paragraph of their own (run
    into the text, SmolLM2 and Gemma-3 read "The pass key is" as a definition even dense)."""
    from accel.eval.ds_retrieval import TASK_VERSION, make_prompts

    assert TASK_VERSION >= 2
    for p in make_prompts(tok, "passkey", [800], 3, seed=0, haystack=haystack):
        k = p.answer
        assert re.fullmatch(r"\d{5}", k)
        assert p.text.startswith("There is an important pass key hidden inside a lot of irrelevant text. ")
        assert p.text.count(f"\n\nThe pass key is {k}. Remember it. {k} is the pass key.\n\n") == 1
        assert p.text.endswith("\n\nNow, what is the pass key mentioned above? The pass key is")
        assert p.text.count(k) == 2


def test_run_retrieval_on_prose_with_a_tiny_model(tok):
    """End to end on a tiny llama with SmolLM2's vocabulary: every method decodes a prose prompt."""
    from accel.eval.ds_retrieval import run_retrieval

    model = accel.models.tiny("llama", vocab_size=len(tok), max_position_embeddings=1024)
    data = torch.randint(0, len(tok), (2, 64), generator=torch.Generator().manual_seed(42))
    art = accel.calibrate(model, DoubleSparsityConfig(heavy_channels=4), data=data, progress=False)
    res = run_retrieval(model, tok, art, tasks=("passkey",), contexts=(300,), n=1, haystack="prose",
                        progress=False, new_tokens=2)
    assert res["haystack"] == "prose" and set(res["accuracy"]["passkey"]) == {"dense", "ds", "sink_recent"}
    from accel.eval.ds_retrieval import format_retrieval

    assert "haystack prose" in format_retrieval(res)


def test_cli_haystack_option(monkeypatch):
    import accel.eval.ds_cli as ds_cli
    import accel.eval.ds_retrieval as ds_retrieval
    from accel.cli import main

    seen = {}
    monkeypatch.setattr(ds_cli, "_load", lambda *a: (None, None, accel.Artifact(configs=[DoubleSparsityConfig()])))
    monkeypatch.setattr(ds_retrieval, "run_retrieval", lambda m, t, a, **kw: seen.update(kw) or {})
    monkeypatch.setattr(ds_retrieval, "format_retrieval", lambda r: "")
    assert main(["eval", "ds-retrieval", "--haystack", "prose"]) == 0 and seen["haystack"] == "prose"
    assert main(["eval", "ds-retrieval"]) == 0 and seen["haystack"] == "filler"


# ---- defaults ----------------------------------------------------------------------------------
def test_new_defaults_are_d4_8bit():
    cfg = DoubleSparsityConfig()
    assert cfg.channels_for(64) == 16 and cfg.channels_for(256) == 64 and cfg.label_bits == 8


def _v1_doc(**params):
    d = DoubleSparsityConfig().to_dict()
    p = {k: v for k, v in d["params"].items() if k != "channel_divisor"}
    p.update({"heavy_channels": None, "label_bits": 16, **params})
    return {"method": "double-sparsity", "version": 1, "params": p}


def test_version1_config_keeps_d8_and_16_bits():
    from accel.configs import config_from_dict

    old = config_from_dict(_v1_doc())
    assert old.channels_for(64) == 8 and old.label_bits == 16
    # A version-1 file from before label_bits existed meant 16-bit labels.
    doc = _v1_doc()
    del doc["params"]["label_bits"]
    assert config_from_dict(doc).label_bits == 16
    # An explicit r stays what it was.
    assert config_from_dict(_v1_doc(heavy_channels=12, label_bits=8)).channels_for(64) == 12
    with pytest.raises(accel.configs.ConfigError, match="version 3"):
        config_from_dict({**_v1_doc(), "version": 3})


def test_old_artifact_on_disk_patches_with_d8_16bit(tmp_path):
    """An artifact saved by version 1 with heavy_channels=None: loaded and patched, it still uses
    r = head_dim / 8 (2 of 16 on the tiny model) and 16-bit labels."""
    from accel.artifact import Artifact

    model = accel.models.tiny("llama")
    data = torch.randint(1, 500, (2, 32), generator=torch.Generator().manual_seed(42))
    art = accel.calibrate(model, DoubleSparsityConfig(heavy_channels=4, min_context=0), data=data, progress=False)
    path = art.save(tmp_path / "ds")
    meta = path / "accel_config.json"
    doc = json.loads(meta.read_text())
    doc["methods"] = [_v1_doc(min_context=0)]
    meta.write_text(json.dumps(doc))
    cfg = Artifact.load(path).configs[0]
    assert cfg.heavy_channels is None and cfg.channels_for(16) == 2 and cfg.label_bits == 16
    accel.patch(model, Artifact.load(path))
    try:
        assert "r=2/16 labels KV-dtype" in str(accel.report(model))
    finally:
        accel.unpatch(model)


def test_calibration_stores_the_resolved_r():
    model = accel.models.tiny("qwen2")
    data = torch.randint(1, 500, (2, 32), generator=torch.Generator().manual_seed(42))
    art = accel.calibrate(model, DoubleSparsityConfig(), data=data, progress=False)
    assert art.configs[0].heavy_channels == 4 and art.configs[0].label_bits == 8  # head_dim 16 / 4
    # What the artifact JSON holds is the number, not "the default".
    assert art.configs[0].to_dict()["params"]["heavy_channels"] == 4


def test_4bit_default_r_must_be_even():
    with pytest.raises(accel.configs.ConfigError, match="even"):
        DoubleSparsityConfig(label_bits=4, channel_divisor=4).channels_for(4 * 3)
    with pytest.raises(accel.configs.ConfigError, match="channel_divisor"):
        DoubleSparsityConfig(channel_divisor=0)


def test_ds_defaults_summary_from_records(tmp_path):
    """`python -m accel.eval.ds_defaults --from-records`: accuracy per cell and the verdict."""
    from accel.eval import ds_defaults

    recs = tmp_path / "r.jsonl"
    rows = [{"model": "m", "context": 2048, "haystack": h, "prompt": i,
             "solved": {"dense": True, "d/8:16": i < 3, "d/4:8": True}} for h in ("filler", "prose") for i in range(4)]
    rows.append({"model": "m", "ppl": {"tokens": 100, "seq_len": 50, "budget": 0.125, "dense": 10.0,
                                       "d/8:16": 10.2, "d/4:8": 10.6}})
    recs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "s.json"
    assert ds_defaults.main(["--from-records", str(recs), "--candidates", "d/8:16,d/4:8", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["passkey"]["m"]["2048"]["prose"] == {"n": 4, "dense": 1.0, "d/8:16": 0.75, "d/4:8": 1.0,
                                                    "dense_solved": 4, "d/8:16 of dense": 0.75, "d/4:8 of dense": 1.0}
    assert res["verdict"]["d/8:16"]["solved_of_dense"] == [6, 8]
    assert res["verdict"]["d/8:16"]["passkey_ok"] is False and res["verdict"]["d/4:8"]["passkey_ok"] is True
    assert res["verdict"]["d/8:16"]["ppl_ok"] == {"m": True} and res["verdict"]["d/4:8"]["ppl_ok"] == {"m": False}
    with pytest.raises(ValueError, match="d/4:8"):
        ds_defaults.parse_candidate("r16")
