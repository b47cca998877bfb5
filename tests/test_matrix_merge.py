"""`accel eval matrix-merge`: runs of one model each become one matrix (table, checks, plots);
runs measured differently, a (model, row) twice and unreadable files are refused (one line, exit 2)."""
import dataclasses
import json

import pytest

from accel import cli
from accel.eval.matrix import MatrixSettings

SETTINGS = dataclasses.asdict(MatrixSettings(contexts=(8192,), threads=(2,)))


def _rec(model, row, wiki, shakes, dec=None):
    r = {"model": model, "row": row, "ppl": {"wiki": wiki, "shakespeare": shakes}, "weight_ratio": 1.0}
    if dec is not None:
        r["speed"] = {"8192/2t": {"prefill_speedup": 1.0, "decode_speedup": dec, "prefill_s": 1.0,
                                  "decode_tok_s": 5.0}}
    return r


def _doc(records, **settings):
    # json round trip: tuples become lists, as in a file written by `accel eval matrix`
    return json.loads(json.dumps({"records": records, "summary": {"settings": {**SETTINGS, **settings}}}))


def _write(tmp_path, name, doc):
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return str(p)


def _run(args, capsys):
    try:
        rc = cli.main(["eval", "matrix-merge", *args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _model_a():
    # ds costs 10% on wiki; ds+wanda-2:4 / wanda-2:4 = 22/20 = 1.10 <= 1.03 * 1.10: PASS
    return [_rec("a", "dense", 10.0, 20.0, 1.0), _rec("a", "ds-1/16", 11.0, 22.0, 3.0),
            _rec("a", "wanda-2:4", 20.0, 40.0, 1.1), _rec("a", "ds+wanda-2:4", 22.0, 44.0, 3.1),
            _rec("a", "ds+gqsa-w4s50", 30.0, 60.0, 2.6)]


def _model_b():
    # ds costs nothing; ds+wanda-2:4 / wanda-2:4 = 1.5 > 1.03: FAIL
    return [_rec("b", "dense", 10.0, 20.0, 1.0), _rec("b", "ds-1/16", 10.0, 20.0, 2.0),
            _rec("b", "wanda-2:4", 20.0, 40.0, 1.0), _rec("b", "ds+wanda-2:4", 30.0, 60.0, 2.0),
            _rec("b", "ds+gqsa-w4s50", 30.0, 60.0, 2.4)]


def test_two_runs_become_one_matrix_with_checks_and_plots(tmp_path, capsys):
    a, b = _write(tmp_path, "a.json", _doc(_model_a())), _write(tmp_path, "b.json", _doc(_model_b()))
    out_json, plots = tmp_path / "m.json", tmp_path / "plots"
    rc, out, err = _run([a, b, "--output", str(out_json), "--plot", str(plots)], capsys)
    assert rc == 0, err
    doc = json.loads(out_json.read_text())
    assert [(r["model"], r["row"]) for r in doc["records"]] == [(r["model"], r["row"])
                                                                 for r in _model_a() + _model_b()]
    comp = {(c["model"], c["row"], c["corpus"]): c for c in doc["summary"]["composition"]}
    assert comp[("a", "ds+wanda-2:4", "wiki")]["verdict"] == "PASS"
    assert comp[("a", "ds+wanda-2:4", "wiki")]["ratio"] == pytest.approx(1.1)
    assert comp[("a", "ds+wanda-2:4", "wiki")]["bound"] == pytest.approx(1.03 * 1.1)
    assert comp[("b", "ds+wanda-2:4", "shakespeare")]["verdict"] == "FAIL"
    # ds+gqsa has no ds+gqsa's weight row (gqsa-w4s50) here: N/A, not a silent pass
    assert comp[("a", "ds+gqsa-w4s50", "wiki")]["verdict"] == "N/A"
    target = {t["model"]: t["verdict"] for t in doc["summary"]["speed_target"]}
    assert target == {"a": "PASS", "b": "FAIL"}
    assert "| a | `ds+wanda-2:4` | 22.00 (2.20) |" in out and "| b | `dense` |" in out
    assert sorted(p.name for p in plots.iterdir()) == ["matrix-a-scatter.png", "matrix-b-scatter.png",
                                                       "matrix-decode-speedup.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in plots.iterdir())


def test_an_accuracy_only_run_merges_with_speed_runs(tmp_path, capsys):
    no_speed = [{k: v for k, v in r.items() if k != "speed"} for r in _model_b()]
    a = _write(tmp_path, "a.json", _doc(_model_a()))
    b = _write(tmp_path, "b.json", _doc(no_speed, speed=False, rounds=1))
    rc, out, err = _run([a, b, "--output", str(tmp_path / "m.json"), "--plot", str(tmp_path / "p")], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["matrix-a-scatter.png",
                                                                  "matrix-decode-speedup.png"]
    assert "| b | `ds-1/16` | 10.00 (1.00) | 20.00 (1.00) | – | 1.00 | – | – |" in out


@pytest.mark.parametrize("b_doc, msg", [
    (lambda: _doc(_model_b(), max_tokens=4096), "max_tokens=4096"),
    (lambda: _doc(_model_b(), seq_len=512), "seq_len=512"),
    (lambda: _doc(_model_b(), rounds=1), "speed with rounds=1"),
    (lambda: _doc(_model_a()), "model a row dense is in both"),
    (lambda: {"records": []}, "not a results file"),
], ids=["tokens", "windows", "speed-rounds", "duplicate-row", "not-results"])
def test_runs_that_do_not_merge_are_refused(b_doc, msg, tmp_path, capsys):
    a = _write(tmp_path, "a.json", _doc(_model_a()))
    b = _write(tmp_path, "b.json", b_doc())
    rc, out, err = _run([a, b, "--output", str(tmp_path / "m.json")], capsys)
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.json").exists()


def test_missing_or_broken_file_and_a_users_output(tmp_path, capsys):
    a = _write(tmp_path, "a.json", _doc(_model_a()))
    rc, out, err = _run([a, str(tmp_path / "nope.json"), "--output", str(tmp_path / "m.json")], capsys)
    assert rc == 2 and "no such file" in err
    (tmp_path / "bad.json").write_text("{not json")
    rc, out, err = _run([a, str(tmp_path / "bad.json"), "--output", str(tmp_path / "m.json")], capsys)
    assert rc == 2 and "not a JSON file" in err
    mine = tmp_path / "mine.json"
    mine.write_text("my notes")
    rc, out, err = _run([a, "--output", str(mine)], capsys)
    assert rc == 2 and "--overwrite" in err and mine.read_text() == "my notes"
