"""eval/bench_ds_generate.py (the issue-16 speed command) runs end to end on a tiny model."""
import math

import pytest

from accel.eval.bench_ds_generate import COMPILED, ROWS, bench, main


def test_bench_rows_and_ratios_on_a_tiny_model(capsys):
    r = bench("tiny-llama", context=64, threads=1, new_tokens=3, rounds=1)
    assert list(r["rows"]) == list(ROWS)
    assert r["rows"]["dense"]["decode_speedup"] == 1.0 and r["rows"]["dense"]["prefill_speedup"] == 1.0
    for row in ROWS:
        cell = r["rows"][row]
        assert cell["decode_tok_s"] > 0 and cell["prefill_s"] > 0 and math.isfinite(cell["decode_speedup"])
    assert main(["--model", "tiny-llama", "--context", "48", "--threads", "1", "--new-tokens", "2", "--rounds", "1",
                 "--rows", "dense,ds", "--clock", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "ds: decode" in out and "cpu clock" in out


@pytest.mark.slow
def test_compiled_row_runs_beside_the_eager_rows():
    """--compile: DS + GQSA under accel.compile on a copy of the model, timed in the same rounds; the
    bench's own model is left uncompiled and unpatched (its dense row stays plain eager)."""
    r = bench("tiny-llama", context=40, threads=1, new_tokens=3, rounds=1, rows=("dense",), compile=True)
    assert list(r["rows"]) == ["dense", COMPILED]
    cell = r["rows"][COMPILED]
    assert cell["decode_tok_s"] > 0 and math.isfinite(cell["decode_speedup"]) and r["compile_s"] > 0
