"""YAML recipes and `accel calibrate recipe`: one documented shape, every bad input named, one
line and exit code 2 from the command line, nothing written on error."""
import pytest
import torch

import accel
from accel.cli import main
from accel.configs import ConfigError
from accel.configs.double_sparsity import DoubleSparsityConfig
from accel.configs.prune import PruneConfig
from test_bad_input_calibration import CharTok

GOOD = """\
- method: double-sparsity
  heavy_channels: 4
  budget: 0.25
  n_dense: 1
- method: prune
  sparsity: 0.5
  pattern: "2:4"
  calibration: {num_calibration_samples: 2}
"""


def test_yaml_round_trip_and_the_python_form_agree(tmp_path):
    r = accel.Recipe.from_yaml(GOOD)
    assert r.stages == (DoubleSparsityConfig(heavy_channels=4, budget=0.25, n_dense=1),
                        PruneConfig(sparsity=0.5, pattern="2:4"))
    assert r.calibration == ({}, {"num_calibration_samples": 2})
    assert accel.Recipe.from_yaml(r.to_yaml()) == r
    (tmp_path / "r.yaml").write_text(GOOD)
    assert accel.Recipe.from_yaml(tmp_path / "r.yaml") == r == accel.Recipe.from_yaml(str(tmp_path / "r.yaml"))
    with pytest.raises(Exception):
        r.stages = ()  # frozen


@pytest.mark.parametrize("text,match", [
    ("- method: wanda\n  sparsity: 0.5\n", r"unknown method 'wanda' \(wanda is method: prune \(init: wanda\)\); "
                                          r"known methods: double-sparsity, gqsa, (keep-last, )?prune, rsparse$"),
    ("- method: nope\n", "unknown method 'nope'.*known methods: double-sparsity"),
    ("method: prune\nsparsity: 0.5\n", "expected a YAML list of stages.*got dict"),
    ("stages:\n  - method: prune\n", "expected a YAML list of stages"),
    ("[]\n", "expected a YAML list of stages.*got an empty list"),
    ("- prune\n- gqsa\n", "stage 1 must be a mapping with a `method: NAME` key"),
    ("- method: prune\n  sparsity: 0.5\n  sparsty: 0.6\n", r"stage 1: prune: unknown config field\(s\) \['sparsty'\]"),
    ("- method: prune\n  pattern: 2:4\n", "stage 1: prune: pattern must be a string, got 124"),
    ("- method: prune\n  calibration: {samples: 4}\n", r"unknown calibration key\(s\) \['samples'\]"),
    ("- method: prune\n  calibration: {seed: -1}\n", "calibration.seed must be an integer >= 0"),
    ("- method: prune\n- method: prune\n  sparsity: 0.6\n", "stages 1 and 2 are both prune"),
    ("- method: prune\n  x: [1\n", "not valid YAML"),
    ("- !!python/object/apply:os.system [echo hi]\n", "not valid YAML"),
])
def test_bad_yaml_is_named(text, match):
    with pytest.raises(ConfigError, match=match):
        accel.Recipe.from_yaml(text)


def test_bad_python_recipes_are_named():
    with pytest.raises(ConfigError, match="at least one stage"):
        accel.Recipe([])
    with pytest.raises(ConfigError, match="stage 2 must be a MethodConfig.*got str"):
        accel.Recipe([PruneConfig(), "gqsa"])
    with pytest.raises(ConfigError, match="does not exist"):
        accel.Recipe.from_yaml("no_such_recipe.yaml")


def _tiny(monkeypatch):
    monkeypatch.setattr(accel.models, "load", lambda *a, **k: (accel.models.tiny("llama"), CharTok()))


def test_cli_calibrates_a_recipe_into_one_artifact(tmp_path, monkeypatch, capsys):
    _tiny(monkeypatch)
    (tmp_path / "r.yaml").write_text(GOOD)
    rc = main(["calibrate", "recipe", str(tmp_path / "r.yaml"), "--model", "tiny", "--output", str(tmp_path / "a"),
               "--num-calibration-samples", "3", "--max-seq-length", "32"])
    assert rc == 0, capsys.readouterr().err
    assert "double-sparsity + prune" in capsys.readouterr().out
    art = accel.Artifact.load(tmp_path / "a")
    assert [c.method for c in art.configs] == ["double-sparsity", "prune"]
    # The stage's own setting wins over the command's; the command's over the method default.
    ds_cal, prune_cal = art.calibration["stages"]
    assert (ds_cal["n_samples"], prune_cal["data"]["n_samples"]) == (3, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "r.yaml"]
    model = accel.models.tiny("llama")
    with accel.patched(model, tmp_path / "a"):
        assert torch.isfinite(model(torch.arange(40)[None], use_cache=False).logits).all()


@pytest.mark.parametrize("text,match", [
    ("- method: double-sparsity\n- method: double-sparsity\n", "stages 1 and 2 are both double-sparsity"),
    ("- method: gqsa\n- method: prune\n",
     r"PatchConflictError: recipe stage 2 \(prune\) cannot follow stage 1 \(gqsa\)"),
    ("- method: turbo\n", "unknown method 'turbo'; known methods"),
    ("method: prune\n", "expected a YAML list of stages"),
    ("- method: prune\n  sparsiti: 0.5\n", r"unknown config field\(s\) \['sparsiti'\]"),
])
def test_cli_bad_recipes_are_one_line_and_exit_2(text, match, tmp_path, monkeypatch, capsys):
    _tiny(monkeypatch)
    (tmp_path / "r.yaml").write_text(text)
    rc = main(["calibrate", "recipe", str(tmp_path / "r.yaml"), "--output", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    import re

    assert re.search(match, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_cli_refuses_the_output_before_loading_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(accel.models, "load", lambda *a, **k: pytest.fail("model loaded before the output check"))
    (tmp_path / "r.yaml").write_text(GOOD)
    thesis = tmp_path / "thesis"
    thesis.write_text("years of work")
    rc = main(["calibrate", "recipe", str(tmp_path / "r.yaml"), "--output", str(thesis), "--overwrite"])
    assert rc == 2 and "is a file" in capsys.readouterr().err and thesis.read_text() == "years of work"


def test_cli_failing_stage_writes_nothing_and_keeps_stage_one(tmp_path, monkeypatch, capsys):
    from accel.calibrate import registry

    _tiny(monkeypatch)
    old = registry.get_calibrator("prune")

    def boom(*a, **k):
        raise CalibrationError("decoder layer 1 produced NaN/inf activations")

    from accel.calibrate.runner import CalibrationError

    monkeypatch.setitem(registry._REGISTRY, "prune", registry.Calibrator("prune", boom, old.needs_data, old.check))
    (tmp_path / "r.yaml").write_text(GOOD)
    rc = main(["calibrate", "recipe", str(tmp_path / "r.yaml"), "--output", str(tmp_path / "a"),
               "--max-seq-length", "32", "--num-calibration-samples", "2"])
    assert rc == 2 and "CalibrationError" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert (tmp_path / "a.partial" / "stage_00" / "artifact" / "accel_config.json").is_file()
