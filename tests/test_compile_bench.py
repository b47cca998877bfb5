"""`accel bench decode` (issue 19): the shape of its output on a tiny model (no timing assertions)."""
import json

from accel.cli import main


def test_bench_decode_json_shape(capsys):
    rc = main(["bench", "decode", "--model", "tiny-llama", "--dtype", "float32", "--methods", "gqsa",
               "--threads", "1", "--new-tokens", "3", "--prompt-tokens", "5", "--rounds", "1", "--compile",
               "--backend", "eager", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("dense_eager_tok_s_1t", "dense_compiled_tok_s_1t", "gqsa_eager_tok_s_1t", "gqsa_compiled_tok_s_1t",
                "dense_eager_prefill_s_1t", "gqsa_compiled_prefill_s_1t"):
        assert r[key] > 0, key
    assert r["compile_seconds"] > 0
    assert set(r["compile_seconds_by_config"]) == {"dense_compiled", "gqsa_compiled"}
    assert {(row["config"], row["threads"]) for row in r["rows"]} == {
        (c, 1) for c in ("dense_eager", "dense_compiled", "gqsa_eager", "gqsa_compiled")}


def test_bench_ops_shape():
    """eval.bench_gqsa.bench_ops: per-call costs of the GQSA ops (no timing assertions)."""
    import pytest

    from accel.kernels.gqsa_linear import cpp_ext
    from eval.bench_gqsa import SMOLLM2_LAYER, bench_ops

    if not cpp_ext.available():
        pytest.skip("no native GQSA kernel on this machine")
    r = bench_ops(threads=(1,), rounds=1, reps=1, layers=2)
    assert len(r["rows"]) == len(SMOLLM2_LAYER)
    assert set(r["per_token_ms"]["1t"]) == {"cpp_op", "py_op", "direct", "dense_bf16"}
    assert all(v > 0 for v in r["per_token_ms"]["1t"].values())
