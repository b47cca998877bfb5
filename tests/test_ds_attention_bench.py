"""`accel bench ds-attention` plumbing (no timing assertions: only that it measures what it says)."""
import json

import torch

from accel.eval import bench_ds_attention as bench


def test_bench_attention_row_is_complete():
    row = bench.bench_attention(T=512, H=6, KVH=2, D=64, rounds=1)
    assert row["budget"] == 32 and row["r"] == 8
    assert set(row["ms"]) == {"sdpa", "grouped_matmul", "ds", "ds_select", "ds_attend"}
    assert all(t > 0 for t in row["ms"].values())
    assert row["best_dense"] in ("sdpa", "grouped_matmul")
    best = min(row["ms"]["sdpa"], row["ms"]["grouped_matmul"])
    # "ms" is rounded to 1 us and "speedup" is not: allow that rounding (times here are >= ~50 us).
    assert abs(row["speedup"] - best / row["ms"]["ds"]) <= 0.05 * row["speedup"]
    # labels of D/8 channels + 1/16 of K and V: 2 / (1/8 + 2/16) = 8x fewer bytes.
    assert row["byte_ratio"] == 8.0


def test_cli_json_last_line(capsys, monkeypatch):
    from accel import cli

    threads = torch.get_num_threads()
    try:
        rc = cli.main(["bench", "ds-attention", "--contexts", "256", "--dtypes", "float32", "--rounds", "1",
                       "--no-e2e", "--json"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(last)
    assert res["threads"] == 1 and len(res["rows"]) == 2 and "speedup_8k" not in res
