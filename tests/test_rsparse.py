"""R-Sparse: budget split, search budgets, calibration → artifact → patch on tiny models, bad inputs."""
import math

import pytest
import torch

import accel
from accel.artifact import Artifact, ArtifactError
from accel.calibrate.rsparse import allocate, build_tensors, collect_stats
from accel.calibrate.rsparse_search import (EvoSettings, budget_of, evolutionary_search, greedy_at, greedy_layer,
                                            project_budget)
from accel.configs import ConfigError
from accel.configs.rsparse import RSparseConfig, rank_for, teal_config
from accel.patches.rsparse import RSparseLinear


def test_rank_budget_split_gqa():
    # 4096x4096, s=0.5, rho=0.8: k = 1638 channels, r = floor(4096*4096*0.5*0.2 / 8192) = 204.
    assert rank_for(4096, 4096, 0.5, 0.8) == 204
    # GQA k/v (out=1024 < in=4096): r = floor(4096*1024*0.5*0.2 / 5120) = 81, not the in=out=hidden 204.
    assert rank_for(4096, 1024, 0.5, 0.8) == 81
    # SmolLM2 k_proj 192x576 at s=0.5, rho=0.5: floor(576*192*0.25/768) = 36
    assert rank_for(576, 192, 0.5, 0.5) == 36
    assert rank_for(576, 192, 0.5, 1.0) == 0
    # rho = 0, s = 0: the whole dense budget goes low-rank, in*out/(in+out) < min(in, out).
    assert rank_for(576, 192, 0.0, 0.0) == 144


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), "0.5"], ids=["one", "neg", "big", "nan", "str"])
def test_bad_sparsity(bad):
    with pytest.raises(ConfigError, match="sparsity"):
        RSparseConfig(sparsity=bad)


def test_bad_config_fields():
    with pytest.raises(ConfigError, match="sparse_share"):
        RSparseConfig(sparse_share=1.2)
    with pytest.raises(ConfigError, match="mode"):
        RSparseConfig(mode="dense")
    with pytest.raises(ConfigError, match="teal"):
        RSparseConfig(mode="teal", sparse_share=0.9)
    assert teal_config(0.4).sparse_share == 1.0


def test_rank_larger_than_min_in_out_is_rejected():
    lin = torch.nn.Linear(16, 8)
    with pytest.raises(ConfigError, match="rank 9"):
        RSparseLinear(lin, 0.1, torch.ones(16), torch.randn(9, 16), torch.randn(8, 9))


@pytest.mark.parametrize("target", [0.4, 0.5, 0.6])
def test_greedy_respects_budget_exactly(target):
    g = torch.Generator().manual_seed(42)
    n = torch.tensor([576 * 576, 192 * 576, 192 * 576, 576 * 576, 1536 * 576, 1536 * 576, 576 * 1536.])
    grid = (0.0, 0.3, 0.5, 0.7, 0.9)
    errors = torch.rand(7, 5, generator=g).cumsum(1) * torch.tensor(grid)  # increasing, 0 at s=0
    s = greedy_at(greedy_layer(errors, grid, n), n, target)
    assert abs(budget_of(s, n) - target) < 1e-9
    assert float(s.min()) >= 0 and float(s.max()) <= 0.9 + 1e-9
    # The cheapest linear (lowest error curve per parameter) gets more than the costliest.
    per = errors[:, -1]
    assert s[int(per.argmin())] > s[int(per.argmax())]


def test_evo_respects_budget_exactly_and_improves():
    g = torch.Generator().manual_seed(42)
    n = torch.randint(1000, 100000, (40,), generator=g).double()
    want = torch.rand(40, generator=g).double()
    seen = []

    def fitness(s, rho):
        seen.append(budget_of(s, n))
        return float(((s - want) ** 2 * n).sum() / n.sum() + (rho - 0.5).pow(2).mean())

    s0 = torch.full((40,), 0.5, dtype=torch.float64)
    r0 = torch.full((40,), 1.0, dtype=torch.float64)
    s, rho, hist = evolutionary_search(s0, r0, n, 0.5, fitness, EvoSettings(population=6, generations=6), False)
    assert all(abs(b - 0.5) < 1e-9 for b in seen)
    assert abs(budget_of(s, n) - 0.5) < 1e-9
    assert hist[-1] < hist[0]


def test_project_budget_clips_and_hits_target():
    n = torch.tensor([1., 2., 3., 4.])
    s = project_budget(torch.tensor([0.0, 0.99, 0.2, 0.4]), n, 0.6)
    assert abs(budget_of(s, n) - 0.6) < 1e-12 and float(s.max()) <= 0.95


def _tiny_stats(model, cfg):
    x = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(42))
    return collect_stats(model, x, cfg, greedy_modes=("rsparse", "teal"), grid=(0.0, 0.5, 0.9),
                         greedy_tokens=64, progress=False), x


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_calibrate_patch_roundtrip(arch, tmp_path):
    model = accel.models.tiny(arch)
    cfg = RSparseConfig(sparsity=0.5, sparse_share=0.7, search="greedy")
    stats, x = _tiny_stats(model, cfg)
    s, rho, _ = allocate(model, stats, cfg)
    assert abs(budget_of(s, stats.counts()) - 0.5) < 1e-9
    art = Artifact.for_model(model, [cfg], build_tensors(model, stats, s, rho, "rsparse"))
    art.save(tmp_path / "a")
    with torch.no_grad():
        dense = model(input_ids=x).logits
        with accel.patched(model, tmp_path / "a"):
            mods = [m for m in model.modules() if isinstance(m, RSparseLinear)]
            assert len(mods) == 7 * 4
            # k/v projections (out 32 < in 64) get the GQA-correct rank.
            kv = [m for m in mods if m.out_features == 32]
            assert kv and all(m.rank == rank_for(64, 32, m.s, m.rho) for m in kv)
            sparse = model(input_ids=x).logits
            active = []
            for m in mods:
                h = m.register_forward_hook(lambda mod, i, o: active.append(
                    float(((i[0].float().abs() * mod.scale) > mod.threshold).float().mean())))
            model(input_ids=x)
        assert not any(isinstance(m, RSparseLinear) for m in model.modules())
        torch.testing.assert_close(model(input_ids=x).logits, dense)
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, dense)
    # Calibration inputs: the mean active fraction is near the planned (1 - s) * rho = 0.35 on average.
    assert 0.2 < sum(active) / len(active) < 0.5


def test_artifact_of_another_model_is_rejected(tmp_path):
    model = accel.models.tiny("llama")
    cfg = teal_config(0.5)
    stats, _ = _tiny_stats(model, cfg)
    s, rho, _ = allocate(model, stats, cfg, search="uniform")
    Artifact.for_model(model, [cfg], build_tensors(model, stats, s, rho, "teal")).save(tmp_path / "a")
    other = accel.models.tiny("llama", seed=1)
    with pytest.raises(ArtifactError, match="different model"):
        accel.patch(other, tmp_path / "a")
    # Even with the fingerprint check off, missing per-linear tensors give a clear error.
    with pytest.raises(ArtifactError, match="no threshold"):
        accel.patch(other, Artifact.for_model(other, [cfg], {}), check_fingerprint=False)
    assert not accel.is_patched(other)


def test_threshold_zero_patch_equals_dense():
    model = accel.models.tiny("mistral")
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(42))
    cfg = teal_config(0.5)
    tensors = {}
    for name, lin in accel.patches.targets.iter_linears(model):
        tensors[f"rsparse/{name}.threshold"] = torch.tensor(0.0)
        tensors[f"rsparse/{name}.s_rho"] = torch.tensor([0.0, 1.0])
    with torch.no_grad():
        dense = model(input_ids=x).logits
        with accel.patched(model, Artifact.for_model(model, [cfg], tensors)):
            torch.testing.assert_close(model(input_ids=x).logits, dense, rtol=1e-5, atol=1e-5)
    assert math.isfinite(float(dense.abs().max()))


def test_stats_pass_is_read_back_without_rerunning(tmp_path, monkeypatch):
    import accel.calibrate.rsparse as R

    model = accel.models.tiny("llama")
    cfg = RSparseConfig(sparsity=0.5)
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(42))
    first = collect_stats(model, x, cfg, grid=(0.0, 0.5, 0.9), greedy_tokens=16, checkpoint_dir=tmp_path,
                          progress=False)

    def boom(*a, **k):
        raise AssertionError("complete pass should not be re-run")
    monkeypatch.setattr(R, "run_layerwise", boom)
    again = collect_stats(model, x, cfg, grid=(0.0, 0.5, 0.9), greedy_tokens=16, checkpoint_dir=tmp_path,
                          progress=False)
    assert set(again.quantiles) == set(first.quantiles) and set(again.errors) == set(first.errors)
    for k in first.quantiles:
        torch.testing.assert_close(again.quantiles[k], first.quantiles[k])
