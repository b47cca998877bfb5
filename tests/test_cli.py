"""The `accel` CLI: help, ppl --json on the real model, and clear errors."""
import json
import math
import subprocess
import sys

import pytest

from accel.cli import main


def test_calibrate_help_lists_group(capsys):
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--help"])
    assert e.value.code == 0
    assert "METHOD" in capsys.readouterr().out


def test_unknown_export_format_is_one_line_exit_2(tmp_path, capsys):
    rc = main(["export", "--format", "bogus", str(tmp_path), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "ConfigError" in err and "unknown format 'bogus'" in err and "known:" in err


def test_ppl_with_missing_artifact_is_a_clear_error(capsys, tmp_path):
    rc = main(["eval", "ppl", "--model", "smollm2-135m", "--artifact", str(tmp_path / "none"),
               "--max-tokens", "64", "--seq-len", "32", "--json"])
    assert rc == 2
    assert "not an accel artifact" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_ppl_json_last_line():
    out = subprocess.run([sys.executable, "-m", "accel.cli", "eval", "ppl", "--model", "smollm2-135m",
                          "--max-tokens", "1024", "--seq-len", "256", "--json"],
                         capture_output=True, text=True, check=True, timeout=600)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["tokens"] == 4 * 255 and math.isfinite(res["ppl"])
    # A working model predicts wiki text far better than chance (vocab 49152).
    assert 3 < res["ppl"] < 60


# --------------------------------------------------------------------------------------------
# Errors: one line, exit 2 for accel errors, 1 for unexpected ones, 130 for Ctrl-C
# --------------------------------------------------------------------------------------------
def _bad_artifact(path):
    """A GQSA artifact whose JSON has `"tile_rows": "1"` (a raw TypeError before validation)."""
    import torch

    import accel
    from accel.artifact import CONFIG_NAME, Artifact
    from accel.configs import IdentityConfig
    from accel.configs.gqsa import GQSAConfig

    Artifact.for_model(accel.models.tiny("llama"), IdentityConfig(), {"identity/a": torch.ones(2)}).save(path)
    doc = json.loads((path / CONFIG_NAME).read_text())
    bad = GQSAConfig().to_dict()
    bad["params"]["tile_rows"] = "1"
    doc["methods"] = [bad]
    (path / CONFIG_NAME).write_text(json.dumps(doc))
    return path


def test_wrong_typed_artifact_is_one_line_exit_2(tmp_path, capsys):
    rc = main(["export", "--format", "sglang-ds", str(_bad_artifact(tmp_path / "a")), "--output",
               str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("accel: error: ArtifactError: ") and "tile_rows" in err and err.count("\n") == 1
    assert not (tmp_path / "o.json").exists()


def test_wrong_typed_artifact_subprocess_no_traceback(tmp_path):
    art = _bad_artifact(tmp_path / "a")
    out = subprocess.run([sys.executable, "-m", "accel.cli", "export", "--format", "sglang-ds", str(art),
                          "--output", str(tmp_path / "o.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "tile_rows" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_output_file_is_refused_before_loading_the_model(tmp_path, capsys, monkeypatch):
    """`accel calibrate gqsa --output FILE`: refused at once, the file untouched, no model loaded."""
    import accel

    thesis = tmp_path / "thesis"
    thesis.write_text("years of work")
    monkeypatch.setattr(accel.models, "load", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("model loaded before the output was checked")))
    for cmd in (["calibrate", "gqsa"], ["calibrate", "rsparse"], ["calibrate", "double-sparsity"]):
        for extra in ([], ["--overwrite"]):
            rc = main(cmd + ["--model", "smollm2-135m", "--output", str(thesis)] + extra)
            err = capsys.readouterr().err
            assert rc == 2, (cmd, err)
            assert "thesis" in err and "is a file" in err
    assert thesis.read_text() == "years of work" and sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]


def test_existing_artifact_needs_overwrite_flag(tmp_path, capsys, monkeypatch):
    import accel

    art = _bad_artifact(tmp_path / "a")
    (art / "accel_config.json").write_text((art / "accel_config.json").read_text().replace('"1"', "1"))
    before = (art / "accel_config.json").read_text()
    monkeypatch.setattr(accel.models, "load", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    rc = main(["calibrate", "gqsa", "--output", str(art)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    # With --overwrite the check passes and the command goes on (to the model load, interrupted here).
    rc = main(["calibrate", "gqsa", "--output", str(art), "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted" in err and "Traceback" not in err
    assert (art / "accel_config.json").read_text() == before


# A RuntimeError that is not an accel error (a torch shape error, out of memory) is a bug or a
# resource problem, not bad input: exit 1 with the -v hint, like any other unexpected exception.
@pytest.mark.parametrize("exc", [TypeError("something internal"),
                                 RuntimeError("mat1 and mat2 shapes cannot be multiplied")],
                         ids=["TypeError", "plain-RuntimeError"])
def test_unexpected_error_is_one_line_exit_1(tmp_path, capsys, exc):
    from accel import cli as cli_mod

    def boom(artifact, output, **kw):
        raise exc

    real = cli_mod.build

    def build():
        c = real()
        c.exporter("boom", boom, "raises")
        return c

    cli_mod.build = build
    try:
        rc = main(["export", "--format", "boom", str(tmp_path), "--output", str(tmp_path / "o")])
    finally:
        cli_mod.build = real
    err = capsys.readouterr().err
    assert rc == 1
    assert "unexpected" in err and f"{type(exc).__name__}: {exc}" in err and "-v" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_verbose_reraises_with_traceback(tmp_path):
    from accel.artifact import ArtifactError

    with pytest.raises(ArtifactError, match="tile_rows"):
        main(["-v", "export", "--format", "sglang-ds", str(_bad_artifact(tmp_path / "a")), "--output",
              str(tmp_path / "o.json")])
