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


def test_unknown_export_format(tmp_path, capsys):
    with pytest.raises(SystemExit, match="unknown format 'bogus'"):
        main(["export", "--format", "bogus", str(tmp_path), "--output", str(tmp_path / "o")])


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
