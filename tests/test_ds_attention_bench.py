"""`accel bench ds-attention` plumbing (no timing assertions: only that it measures what it says)."""
import json

import pytest
import torch

from accel.eval import bench_ds_attention as bench


def test_bench_attention_row_is_complete():
    row = bench.bench_attention(T=512, H=6, KVH=2, D=64, rounds=1)
    assert row["budget"] == 32 and row["r"] == 8
    assert set(row["ms"]) == {"sdpa", "grouped_matmul", "ds", "ds_select", "ds_attend"}
    assert all(t > 0 for t in row["ms"].values())
    assert row["best_dense"] in ("sdpa", "grouped_matmul")
    # labels of D/8 channels + 1/16 of K and V: 2 / (1/8 + 2/16) = 8x fewer bytes.
    assert row["byte_ratio"] == 8.0


# Seconds per call of each variant, round by round (3 rounds), chosen so that every reported
# ratio has a different value: mins sdpa 2.0, grouped 1.8, ds 0.6 ms; medians 3.0, 2.4, 0.9 ms.
FAKE_MS = {"sdpa": [4.0, 2.0, 3.0], "grouped_matmul": [1.8, 2.4, 6.0], "ds": [0.9, 0.6, 1.2],
           "ds_select": [0.5, 0.4, 0.7], "ds_attend": [0.3, 0.2, 0.25]}


def test_bench_attention_ratios_from_a_fake_clock(monkeypatch):
    """Each op is a stub that advances a fake perf_counter by a known time; the warm-up call takes
    1 ns, so counting it would make every min 1e-6 ms. Expected ratios are worked out by hand."""
    import types

    import accel.kernels.ds_attention as ds_pkg
    import accel.kernels.ds_attention.cpu as ds_cpu

    now = [0.0]
    calls = {n: 0 for n in FAKE_MS}

    def stub(name, untimed=1):
        def op(*args, **kwargs):
            i = calls[name]
            calls[name] += 1
            now[0] += 1e-9 if i < untimed else FAKE_MS[name][i - untimed] * 1e-3
        return op

    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", stub("sdpa"))
    monkeypatch.setattr(ds_cpu, "dense_decode_cpu", stub("grouped_matmul"))
    monkeypatch.setattr(ds_pkg, "ds_decode_attention", stub("ds"))
    monkeypatch.setattr(ds_cpu, "ds_attend_cpu", stub("ds_attend"))
    # ds_select_cpu also runs once before the rounds, to make the indices ds_attend reads.
    monkeypatch.setattr(ds_cpu, "ds_select_cpu", stub("ds_select", untimed=2))
    row = bench.bench_attention(T=1000, H=4, KVH=2, D=64, dtype="bfloat16", rounds=3)
    assert calls == {**{n: 4 for n in FAKE_MS}, "ds_select": 5}  # (setup +) warm-up + 3 rounds
    assert row["ms"] == {"sdpa": 2.0, "grouped_matmul": 1.8, "ds": 0.6, "ds_select": 0.4, "ds_attend": 0.2}
    assert row["ms_median"] == {"sdpa": 3.0, "grouped_matmul": 2.4, "ds": 0.9, "ds_select": 0.5, "ds_attend": 0.25}
    assert row["best_dense"] == "grouped_matmul"
    assert row["speedup"] == pytest.approx(3.0)            # 1.8 / 0.6
    assert row["speedup_median"] == pytest.approx(8 / 3)   # min(3.0, 2.4) / 0.9
    assert row["speedup_paired"] == pytest.approx(2.5)     # median(1.8/0.9, 2.0/0.6, 3.0/1.2)
    assert row["speedup_vs_sdpa"] == pytest.approx(10 / 3)  # 2.0 / 0.6
    # budget int(1000/16) = 62, r = 64/8 = 8, bf16 = 2 bytes:
    # dense 2*2*1000*64*2 = 512000; DS labels 2*1000*8*2 = 32000 + rows 2*2*62*64*2 = 31744.
    assert (row["budget"], row["r"]) == (62, 8)
    assert row["byte_ratio"] == pytest.approx(512000 / 63744)


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
