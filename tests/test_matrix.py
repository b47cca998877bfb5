"""`accel eval matrix` end to end on a tiny llama with a character tokenizer (fast): --json shape,
plots, the composition check, calibrations cached across runs, and bad input (one line, exit 2)."""
import json

import pytest
import torch

import accel
from accel import cli
from accel.eval import matrix


class _CharTok:
    bos_token_id = None

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [ord(c) % 500 + 1 for c in text]

        class R:
            input_ids = torch.tensor([ids]) if return_tensors == "pt" else ids
        return R()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i) - 1) for i in ids)


def _fake_load(name, dtype):
    assert name == "tiny-llama"
    # fp32 then cast, so that both loads have the same weights (one fingerprint, one cache key).
    return accel.models.tiny("llama").to(getattr(torch, dtype)), _CharTok()


SMALL = ["--models", "tiny-llama", "--max-tokens", "256", "--seq-len", "128", "--batch-size", "2",
         "--passkey-context", "192", "--passkey-n", "1", "--contexts", "48,80", "--threads", "1", "--rounds", "1",
         "--new-tokens", "3", "--num-calibration-samples", "2", "--max-seq-length", "64"]
ROWS = "dense,ds-1/16,wanda-2:4,ds+wanda-2:4"


@pytest.fixture
def counted(monkeypatch):
    monkeypatch.setattr(matrix, "load_model", _fake_load)
    calls = []
    real = matrix._calibrate

    def spy(model, recipe, *a, **k):
        calls.append(recipe.methods)
        return real(model, recipe, *a, **k)

    monkeypatch.setattr(matrix, "_calibrate", spy)
    return calls


def _run(args, capsys):
    try:
        rc = cli.main(["eval", "matrix", *args])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_end_to_end_json_plots_and_cache_reuse(tmp_path, capsys, counted, monkeypatch):
    cache, plots = tmp_path / "cache", tmp_path / "plots"
    args = SMALL + ["--rows", ROWS, "--cache-dir", str(cache), "--json"]
    rc, out, err = _run(args + ["--output", str(tmp_path / "a.json"), "--plot", str(plots)], capsys)
    assert rc == 0, err
    lines = [json.loads(x) for x in out.strip().splitlines()]
    recs, summ = lines[:-1], lines[-1]
    assert [r["row"] for r in recs] == ROWS.split(",") and summ["summary"] is True
    by = {r["row"]: r for r in recs}
    for r in recs:
        assert set(r["ppl"]) == {"wiki", "shakespeare"} and all(v > 1 for v in r["ppl"].values())
        assert set(r["speed"]) == {"48/1t", "80/1t"}
        assert r["speed"]["80/1t"]["decode_tok_s"] > 0 and r["speed"]["80/1t"]["prefill_s"] > 0
        assert r["weight_bytes"] > 0 and r["dense_bf16_bytes"] > 0
    assert by["dense"]["weight_ratio"] == 1.0 and by["dense"]["speed"]["48/1t"]["decode_speedup"] == 1.0
    assert "passkey" in by["ds-1/16"] and "passkey" in by["ds+wanda-2:4"] and "passkey" not in by["wanda-2:4"]
    assert by["ds+wanda-2:4"]["methods"] == ["double-sparsity", "prune"]
    assert [s["n_samples"] for s in by["ds+wanda-2:4"]["calibration"]] == [2, 2]
    comp = [c for c in summ["composition"] if c["row"] == "ds+wanda-2:4"]
    assert {c["corpus"] for c in comp} == {"wiki", "shakespeare"} and all(c["verdict"] in ("PASS", "FAIL")
                                                                          for c in comp)
    w = next(c for c in comp if c["corpus"] == "wiki")
    assert w["ratio"] == pytest.approx(by["ds+wanda-2:4"]["ppl"]["wiki"] / by["wanda-2:4"]["ppl"]["wiki"])
    assert w["bound"] == pytest.approx(1.03 * by["ds-1/16"]["ppl"]["wiki"] / by["dense"]["ppl"]["wiki"])
    assert sorted(p.name for p in plots.iterdir()) == ["matrix-decode-speedup.png", "matrix-tiny-llama-scatter.png"]
    assert all((plots / n).read_bytes()[:4] == b"\x89PNG" for n in ("matrix-decode-speedup.png",))
    saved = json.loads((tmp_path / "a.json").read_text())
    assert len(saved["records"]) == 4 and saved["summary"]["composition"] == summ["composition"]
    assert sorted(counted) == [["double-sparsity"], ["double-sparsity", "prune"], ["prune"]]
    assert not any(r["accuracy_cached"] for r in recs)
    # A rerun only measures speed: every calibration and every accuracy result comes from the cache.
    import accel.eval.perplexity as ppl_mod

    real_ppl = ppl_mod.perplexity
    monkeypatch.setattr(ppl_mod, "perplexity", lambda *a, **k: pytest.fail("perplexity recomputed"))
    rc, out, err = _run(args + ["--output", str(tmp_path / "b.json")], capsys)
    assert rc == 0, err
    assert len(counted) == 3
    recs2 = [json.loads(x) for x in out.strip().splitlines()][:-1]
    assert [r["calibration_cached"] for r in recs2] == [False, True, True, True]
    assert [r["accuracy_cached"] for r in recs2] == [True] * 4
    assert [r["ppl"] for r in recs2] == [r["ppl"] for r in recs]
    assert [r.get("passkey") for r in recs2] == [r.get("passkey") for r in recs]
    # --recompute measures again (same artifacts, so the same perplexities).
    calls = []
    monkeypatch.setattr(ppl_mod, "perplexity", lambda *a, **k: calls.append(1) or real_ppl(*a, **k))
    rc, out, err = _run(SMALL + ["--rows", "dense", "--cache-dir", str(cache), "--json", "--no-speed",
                                 "--recompute", "--output", str(tmp_path / "r.json")], capsys)
    assert rc == 0, err
    rec = json.loads(out.strip().splitlines()[0])
    assert len(calls) == 2 and rec["accuracy_cached"] is False and rec["ppl"] == by["dense"]["ppl"]
    # A new passkey task version measures the passkey again, not the perplexities.
    import accel.eval.ds_retrieval as ret

    monkeypatch.setattr(ppl_mod, "perplexity", lambda *a, **k: pytest.fail("perplexity recomputed"))
    monkeypatch.setattr(ret, "TASK_VERSION", ret.TASK_VERSION + 1)
    runs = []
    real_ret = ret.run_retrieval
    monkeypatch.setattr(ret, "run_retrieval", lambda *a, **k: runs.append(1) or real_ret(*a, **k))
    rc, out, err = _run(SMALL + ["--rows", "ds-1/16", "--cache-dir", str(cache), "--json", "--no-speed",
                                 "--output", str(tmp_path / "p.json")], capsys)
    assert rc == 0, err
    rec = json.loads(out.strip().splitlines()[0])
    assert runs == [1] and rec["accuracy_cached"] is False and rec["passkey"] == by["ds-1/16"]["passkey"]
    monkeypatch.setattr(ppl_mod, "perplexity", real_ppl)
    # Other calibration settings are another cache entry.
    rc, out, err = _run(SMALL[:-2] + ["--max-seq-length", "32", "--rows", "wanda-2:4", "--cache-dir", str(cache),
                                      "--output", str(tmp_path / "c.json"), "--no-speed"], capsys)
    assert rc == 0, err
    assert len(counted) == 4 and "composition check" in out and "wanda-2:4" in out


@pytest.mark.parametrize("args, msg", [
    (["--rows", "dense,wanda-70"], "unknown row 'wanda-70'"),
    (["--models", "no-such-model"], "unknown model 'no-such-model'"),
    (["--models", "tiny-llama", "--rows", "dense", "--contexts", "0"], "positive integers"),
])
def test_bad_input_is_one_line_exit_2(args, msg, tmp_path, capsys, counted):
    rc, out, err = _run(["--output", str(tmp_path / "o.json"), *args], capsys)
    assert rc == 2 and msg in err
    if "--contexts" not in args:  # argparse's own errors come after its usage lines
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.json").exists() and counted == []


def test_a_users_file_is_refused_before_any_work(tmp_path, capsys, counted, monkeypatch):
    mine = tmp_path / "mine.json"
    mine.write_text("my notes")
    monkeypatch.setattr(matrix, "load_model", lambda *a: pytest.fail("work started before the output check"))
    rc, out, err = _run(SMALL + ["--rows", "dense", "--output", str(mine)], capsys)
    assert rc == 2 and "--overwrite" in err and mine.read_text() == "my notes"
    d = tmp_path / "plots"
    d.mkdir()
    (d / "matrix-decode-speedup.png").write_text("mine")
    rc, out, err = _run(SMALL + ["--rows", "dense", "--output", str(tmp_path / "new.json"), "--plot", str(d)], capsys)
    assert rc == 2 and "matrix-decode-speedup.png" in err and not (tmp_path / "new.json").exists()


def test_a_changed_config_version_or_bos_is_another_cache_entry(tmp_path, counted, monkeypatch):
    from accel.configs.prune import PruneConfig

    model, tok = _fake_load("tiny-llama", "float32")
    st = matrix.MatrixSettings(num_calibration_samples=2, max_seq_length=32)
    cache = tmp_path / "cache"
    art, cached, _ = matrix.row_artifact(model, tok, "tiny-llama", "wanda-2:4", st, cache, progress=False)
    assert not cached and len(counted) == 1
    assert matrix.row_artifact(model, tok, "tiny-llama", "wanda-2:4", st, cache, progress=False)[1]
    # A config whose version (and so its defaults) changed must not reuse the old artifact.
    monkeypatch.setattr(PruneConfig, "version", PruneConfig.version + 1)
    _, cached, _ = matrix.row_artifact(model, tok, "tiny-llama", "wanda-2:4", st, cache, progress=False)
    assert not cached and len(counted) == 2
    monkeypatch.undo()

    # A tokenizer that now puts BOS before a text: other calibration tokens, another key.
    class BosTok(_CharTok):
        bos_token_id = 0

        def __call__(self, text, add_special_tokens=False, return_tensors=None):
            r = super().__call__(text, return_tensors=return_tensors)
            if add_special_tokens:
                r.input_ids = [0, *r.input_ids] if return_tensors != "pt" else r.input_ids
            return r
    assert matrix.cache_key(model, BosTok(), "wanda-2:4", st) != matrix.cache_key(model, tok, "wanda-2:4", st)


def test_markdown_table_of_records():
    from accel.eval.matrix_markdown import markdown_table, summary_lines

    sp = {"8192/2t": {"prefill_speedup": 1.0, "decode_speedup": 1.0}}
    recs = [{"model": "m", "row": "dense", "ppl": {"wiki": 10.0, "shakespeare": 20.0}, "weight_ratio": 1.0,
             "speed": sp},
            {"model": "m", "row": "ds+gqsa-w4s50", "ppl": {"wiki": 12.5, "shakespeare": 30.0}, "weight_ratio": 0.3,
             "passkey": {"ds": 0.95, "n": 20, "context": 4096},
             "speed": {"8192/2t": {"prefill_speedup": 0.97, "decode_speedup": 2.61}}}]
    lines = markdown_table(recs).splitlines()
    assert lines[0].startswith("| model | row | ppl wiki (×dense) | ppl shakespeare (×dense) | passkey | bytes |")
    assert lines[2] == "| m | `dense` | 10.00 | 20.00 | – | 1.00 | 1.00× | 1.00× |"
    assert lines[3] == "| m | `ds+gqsa-w4s50` | 12.50 (1.25) | 30.00 (1.50) | 95% (n=20, 4096 tok) | 0.30 | 0.97× | 2.61× |"
    s = summary_lines({"composition": [{"model": "m", "row": "ds+x", "corpus": "wiki", "ratio": 1.01,
                                        "bound": 1.05, "verdict": "PASS"}], "speed_target": []})
    assert s == "- composition m `ds+x` wiki: ppl(DS+X)/ppl(X) 1.010 vs bound 1.050: **PASS**"


def test_an_interrupted_model_keeps_its_finished_rows(tmp_path, capsys, counted, monkeypatch):
    from accel.calibrate.errors import CalibrationError

    real = matrix._calibrate

    def fail_on_prune(model, recipe, *a, **k):
        if "prune" in recipe.methods:
            raise CalibrationError("stage 1 (prune) failed: out of memory")
        return real(model, recipe, *a, **k)

    monkeypatch.setattr(matrix, "_calibrate", fail_on_prune)
    out = tmp_path / "o.json"
    rc, _, err = _run(SMALL + ["--rows", "dense,ds-1/16,wanda-2:4", "--cache-dir", str(tmp_path / "c"),
                               "--output", str(out)], capsys)
    assert rc == 2 and "out of memory" in err
    doc = json.loads(out.read_text())
    assert [r["row"] for r in doc["records"]] == ["dense", "ds-1/16"]
    assert "passkey" in doc["records"][1] and "speed" not in doc["records"][1]
    assert doc["incomplete"].startswith("tiny-llama: accuracy of 2 rows")


def test_each_composed_row_has_the_other_stage_order_outside_the_default_set():
    from accel.eval import matrix_rows as mr

    assert mr.recipe("wanda-2:4+ds").methods == ["prune", "double-sparsity"]
    assert mr.recipe("ds+wanda-2:4").methods == ["double-sparsity", "prune"]
    assert mr.recipe("gqsa-w4s50+ds").methods == ["gqsa", "double-sparsity"]
    assert "ds+wanda-2:4" not in mr.DEFAULT_ROWS and "gqsa-w4s50+ds" not in mr.DEFAULT_ROWS
    assert "wanda-2:4+ds" in mr.DEFAULT_ROWS and "ds+gqsa-w4s50" in mr.DEFAULT_ROWS and len(mr.DEFAULT_ROWS) == 10
    assert mr.COMPOSED["wanda-2:4+ds"] == "wanda-2:4" and mr.has_ds("gqsa-w4s50+ds")
    assert set(mr.DESCRIPTIONS) == set(mr.ROWS) and set(mr.DEFAULT_ROWS) <= set(mr.ROWS)
