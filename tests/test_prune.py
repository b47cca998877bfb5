"""Wanda / magnitude pruning (DSnoT: test_dsnot.py): masks, calibration walk, resume, artifact, export, bad input."""
import math

import pytest
import torch

import accel
from accel.calibrate.prune import export_hf, prune_model
from accel.calibrate.prune_artifact import calibrate_prune
from accel.calibrate.runner import CalibrationError
from accel.calibrate.wanda import magnitude_mask, nm_mask, row_mask, variant_mask, wanda_mask
from accel.configs import ConfigError
from accel.configs.prune import PruneConfig
from accel.patches.prune import MaskedLinear, pack_mask, unpack_mask
from accel.patches.targets import TargetError

G = lambda: torch.Generator().manual_seed(42)  # noqa: E731


# --------------------------------------------------------------------------------------------
# Masks: exact sparsity
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.6, 0.7, 0.99], ids=lambda s: f"s{s}")
def test_row_mask_prunes_exactly_per_row(sparsity):
    scores = torch.rand(37, 1000, generator=G())
    keep = row_mask(scores, sparsity)
    pruned = (~keep).sum(1)
    assert (pruned == math.floor(sparsity * 1000)).all()
    # The pruned ones are the lowest of their row.
    for r in range(0, 37, 9):
        if pruned[r]:
            assert scores[r][~keep[r]].max() <= scores[r][keep[r]].min()


def test_row_mask_ties_stay_exact():
    scores = torch.ones(5, 10)
    scores[0, 3] = 0.5
    keep = row_mask(scores, 0.5)
    assert ((~keep).sum(1) == 5).all()
    assert not keep[0, 3] and keep[1].tolist() == [False] * 5 + [True] * 5  # stable: lower index first


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 3), (3, 4), (5, 8)], ids=lambda v: str(v))
def test_nm_mask_prunes_exactly_n_per_block(n, m):
    scores = torch.rand(13, 24 * m, generator=G())
    keep = nm_mask(scores, n, m).view(13, 24, m)
    assert ((~keep).sum(-1) == n).all()
    blocks = scores.view(13, 24, m)
    assert (torch.where(~keep, blocks, -1.0).amax(-1) <= torch.where(keep, blocks, 2.0).amin(-1)).all()


def test_magnitude_is_layer_wide_and_exact():
    w = torch.randn(16, 40, generator=G())
    w[0] *= 100  # a row of large weights keeps everything under a layer-wide threshold
    keep = magnitude_mask(w, 0.5)
    assert (~keep).sum() == 16 * 40 // 2
    assert keep[0].all()
    assert w.abs()[~keep].max() <= w.abs()[keep].min()


def test_variant_hits_layer_sparsity_with_uneven_rows():
    # Rows with heavier tails (larger exponent) put more of their total in few weights.
    w = torch.randn(64, 512, generator=G()).abs() ** torch.linspace(0.5, 4, 64).unsqueeze(1)
    keep = variant_mask(w, 0.5)
    assert abs((1 - keep.float().mean()).item() - 0.5) <= 0.002
    per_row = 1 - keep.float().mean(1)
    assert per_row.max() - per_row.min() > 0.05


def test_pack_roundtrip_and_size():
    keep = torch.rand(7, 13, generator=G()) > 0.5
    packed = pack_mask(keep)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(7 * 13 / 8)
    assert torch.equal(unpack_mask(packed, (7, 13)), keep)
    with pytest.raises(accel.ArtifactError, match="does not fit"):
        unpack_mask(packed, (7, 14))


# --------------------------------------------------------------------------------------------
# Wanda picks what the formula says
# --------------------------------------------------------------------------------------------
def test_wanda_hand_made_layer():
    # Inputs: column norms are ||x_0|| = 5 (3,4), ||x_1|| = 0.1, ||x_2|| = 1, ||x_3|| = 13 (5,12).
    x = torch.tensor([[3.0, 0.1, 0.0, 5.0],
                      [4.0, 0.0, 1.0, 12.0]])
    w = torch.tensor([[1.0, -8.0, 2.0, 0.5],
                      [-0.3, 20.0, -4.0, 0.1]])
    # Scores by hand: row 0: 5, 0.8, 2, 6.5 -> prune cols 1, 2.
    #                 row 1: 1.5, 2.0, 4, 1.3 -> prune cols 3, 0.
    # Magnitude (per row) would prune cols 3, 0 in row 0 and 3, 0 in row 1: Wanda differs in row 0.
    keep = wanda_mask(w, x.pow(2).sum(0), 0.5)
    assert keep.tolist() == [[True, False, False, True], [False, True, True, False]]
    # 1:2 on the same layer: blocks (0,1), (2,3). Row 0: 5 vs 0.8 -> prune 1; 2 vs 6.5 -> prune 2.
    # Row 1: 1.5 vs 2 -> prune 0; 4 vs 1.3 -> prune 3.
    keep = wanda_mask(w, x.pow(2).sum(0), 0.5, nm=(1, 2))
    assert keep.tolist() == [[True, False, False, True], [False, True, True, False]]


def _layer0_inputs(model, x, masks=None):
    """Inputs of layer 0's q_proj and down_proj in `model`, with `masks` (name -> keep) applied
    first to layer 0's linears."""
    layer = model.model.layers[0]
    if masks:
        with torch.no_grad():
            for name, mod in layer.named_modules():
                full = f"model.layers.0.{name}"
                if full in masks:
                    mod.weight.mul_(masks[full].to(mod.weight.dtype))
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.setdefault(n, []).append(i[0].detach().clone()))
             for n, m in [("q", layer.self_attn.q_proj), ("down", layer.mlp.down_proj)]]
    with torch.no_grad():
        model(input_ids=x, use_cache=False)
    for h in hooks:
        h.remove()
    return seen


def _expected_mask(w, xs):
    scores = w.abs() * xs.reshape(-1, w.size(1)).pow(2).sum(0).sqrt()
    # 50%: keep the upper half of each row.
    return scores >= scores.topk(w.size(1) // 2, dim=1).values[:, -1:]


@pytest.mark.parametrize("mode", ["two-pass", "joined"])
def test_walk_uses_the_right_inputs_of_each_linear(mode):
    """Layer 0's masks come from each linear's inputs, captured here independently: in the dense
    layer (two-pass), or in the layer whose earlier linears are already pruned (joined)."""
    model = accel.models.tiny("llama")
    x = torch.randint(0, 512, (4, 16), generator=G())
    layer = model.model.layers[0]
    w_q, w_down = layer.self_attn.q_proj.weight.clone(), layer.mlp.down_proj.weight.clone()
    info = prune_model(model, PruneConfig(sparsity=0.5), x, batch_size=2, progress=False, mode=mode)
    assert info.mode == mode
    fresh = accel.models.tiny("llama")
    earlier = None if mode == "two-pass" else {n: k for n, k in info.masks.items()
                                               if n.startswith("model.layers.0.") and "down_proj" not in n}
    seen = _layer0_inputs(fresh, x, earlier)
    for n, w in [("q", w_q), ("down", w_down)]:
        expected = _expected_mask(w, torch.cat(seen[n]))
        got = info.masks[f"model.layers.0.{'self_attn.q_proj' if n == 'q' else 'mlp.down_proj'}"]
        assert (got != expected).float().mean() < 0.005  # float noise at the boundary only
    if mode == "joined":
        # The modes really differ: down_proj's dense-layer inputs would give another mask.
        dense_down = _expected_mask(w_down, torch.cat(_layer0_inputs(accel.models.tiny("llama"), x)["down"]))
        assert (dense_down != info.masks["model.layers.0.mlp.down_proj"]).float().mean() > 0.01
    assert (layer.self_attn.q_proj.weight == 0).float().mean().item() == pytest.approx(0.5)


def test_joined_and_two_pass_outputs_match_their_masks():
    """Both modes leave the model computing with exactly the masks they report."""
    for mode in ("joined", "two-pass"):
        model = accel.models.tiny("qwen3")
        x = torch.randint(0, 512, (3, 20), generator=G())
        info = prune_model(model, PruneConfig(sparsity=0.6), x, batch_size=2, progress=False, mode=mode)
        for name, mod in model.named_modules():
            if name in info.masks:
                assert torch.equal(mod.weight != 0, info.masks[name] & (mod.weight != 0))
                assert (info.masks[name].float().mean(1) - 0.4).abs().max() < 0.02


def test_bad_mode_is_rejected():
    with pytest.raises(ConfigError, match="mode"):
        prune_model(accel.models.tiny("llama"), PruneConfig(sparsity=0.5), torch.zeros(2, 8, dtype=torch.long),
                    mode="fast")


# --------------------------------------------------------------------------------------------
# Calibration walk, resume, artifact, patch, export
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", accel.models.TINY_ARCHS)
def test_calibrate_tiny_archs_exact_sparsity(arch):
    model = accel.models.tiny(arch)
    x = torch.randint(0, 512, (3, 16), generator=G())
    info = prune_model(model, PruneConfig(pattern="2:4", sparsity=None, dsnot=True), x, progress=False)
    assert len(info.masks) == 4 * 7
    for name, keep in info.masks.items():
        assert ((~keep).view(keep.size(0), -1, 4).sum(-1) == 2).all(), name
        w = model.get_submodule(name).weight
        assert torch.equal(w == 0, ~keep | (w == 0)) and (w[~keep] == 0).all()


def test_resume_equals_uninterrupted(tmp_path):
    x = torch.randint(0, 512, (4, 16), generator=G())
    cfg = PruneConfig(sparsity=0.6, dsnot=True)
    full = accel.models.tiny("qwen2")
    a = prune_model(full, cfg, x, batch_size=2, progress=False)
    part = accel.models.tiny("qwen2")
    prune_model(part, cfg, x, batch_size=2, checkpoint_dir=tmp_path, progress=False, stop_after=2)
    resumed = accel.models.tiny("qwen2")
    b = prune_model(resumed, cfg, x, batch_size=2, checkpoint_dir=tmp_path, progress=False)
    assert b.run.resumed_layers == 2
    assert a.masks.keys() == b.masks.keys()
    for n in a.masks:
        assert torch.equal(a.masks[n], b.masks[n]), n
    for (n, p), (_, q) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), n


def test_artifact_patch_export_reload_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    x = torch.randint(0, 512, (4, 16), generator=G())
    r = calibrate_prune(str(tmp_path / "art"), model=accel.models.tiny("llama"), samples=x,
                        model_name="tiny-llama", sparsity=0.5, progress=False)
    assert r["time_ratio"] > 0 and r["sparsity_measured"] == pytest.approx(0.5)
    calibrated = accel.models.tiny("llama")
    prune_model(calibrated, PruneConfig(sparsity=0.5), x, progress=False)

    model = accel.models.tiny("llama")
    ids = torch.randint(0, 512, (2, 20), generator=G())
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        accel.patch(model, tmp_path / "art")
        assert {row["kernel"] for row in accel.report(model).rows} == {"dense-masked"}
        assert isinstance(model.model.layers[0].mlp.up_proj, MaskedLinear)
        patched = model(input_ids=ids).logits
        ref = calibrated(input_ids=ids).logits
        accel.unpatch(model)
        assert torch.equal(model(input_ids=ids).logits, dense)
    torch.testing.assert_close(patched, ref, rtol=1e-6, atol=1e-6)

    export_hf(tmp_path / "art", tmp_path / "hf")  # reloads tiny-llama from the recorded source
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, patched, rtol=0, atol=0)
    assert (reloaded.model.layers[2].self_attn.o_proj.weight == 0).float().mean().item() == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# Bad input: clear error, nothing written
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(sparsity=1.0), "sparsity must be in"), (dict(sparsity=-0.1), "sparsity must be in"),
    (dict(sparsity=float("nan")), "sparsity must be in"), (dict(pattern="4:4", sparsity=None), "N < M"),
    (dict(pattern="5:4", sparsity=None), "N < M"), (dict(pattern="2-4"), "N:M"),
    (dict(pattern="2:4", sparsity=0.6), "contradicts"), (dict(init="random"), "init must be"),
    (dict(pattern="2:4", sparsity=None, use_variant=True), "unstructured sparsity only"),
], ids=["s1", "s-neg", "s-nan", "nm-4:4", "nm-5:4", "nm-garbled", "nm-vs-sparsity", "init", "variant-nm"])
def test_bad_config(kw, match):
    with pytest.raises(ConfigError, match=match):
        PruneConfig(**kw)


@pytest.mark.parametrize("case", ["nm-not-dividing", "targets-nothing", "empty-data", "nan-activations"])
def test_bad_input_writes_nothing(tmp_path, case):
    model = accel.models.tiny("llama")
    x = torch.randint(0, 512, (2, 8), generator=G())
    kw = dict(sparsity=0.5)
    err = ConfigError
    if case == "nm-not-dividing":
        kw = dict(sparsity=None, pattern="2:3")
        match = "divisible by 3"
    elif case == "targets-nothing":
        kw["targets"] = ["re:nope_proj"]
        err, match = TargetError, "match no linear"
    elif case == "empty-data":
        x = torch.zeros(0, 8, dtype=torch.long)
        err, match = CalibrationError, "non-empty|samples"
    else:
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
        err, match = CalibrationError, "NaN"
    out = tmp_path / "art"
    with pytest.raises(err, match=match):
        calibrate_prune(str(out), model=model, samples=x, model_name="tiny-llama", progress=False, **kw)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Real model
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_wanda_beats_magnitude():
    from accel.data import calibration_samples, eval_tokens
    from accel.eval.perplexity import perplexity

    model, tok = accel.models.load("smollm2-135m")
    ids = eval_tokens(tok, "wiki", 2048)
    samples = calibration_samples(tok, n_samples=8, seq_len=256)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    prune_model(model, PruneConfig(init="magnitude", sparsity=0.5), progress=False)
    mag = perplexity(model.to(torch.bfloat16), ids, progress=False).ppl
    model.to(torch.float32).load_state_dict(sd)
    prune_model(model, PruneConfig(sparsity=0.5), samples, progress=False)
    wanda = perplexity(model.to(torch.bfloat16), ids, progress=False).ppl
    assert wanda * 2 < mag, (wanda, mag)


def test_early_exit_stats_equal_full_pass_and_skip_the_rest():
    from accel.calibrate.runner import capture_inputs, linear_input_stats

    model = accel.models.tiny("mistral")
    data = capture_inputs(model, torch.randint(0, 512, (3, 12), generator=G()), batch_size=2)
    layer = model.model.layers[0]
    mods = {"q": layer.self_attn.q_proj, "up": layer.mlp.up_proj}
    calls = []
    h = layer.mlp.down_proj.register_forward_hook(lambda *a: calls.append(1))
    got = {}
    for early in (False, True):
        sums = {}
        linear_input_stats(layer, data, 0, mods, lambda n, x: sums.__setitem__(n, sums.get(n, 0) + x.sum(0)),
                           early_exit=early)
        got[early] = sums
    h.remove()
    assert len(calls) == 2  # two chunks in the full pass, none with early exit
    for n in mods:
        assert torch.equal(got[False][n], got[True][n])


def test_calibrate_overwrite_replaces_an_existing_artifact_only_when_asked(tmp_path):
    from accel.artifact import Artifact, ArtifactError

    x = torch.randint(0, 512, (2, 16), generator=G())
    out = tmp_path / "art"
    calibrate_prune(str(out), model=accel.models.tiny("llama"), samples=x, sparsity=0.5, progress=False)
    with pytest.raises(ArtifactError, match="--overwrite"):
        calibrate_prune(str(out), model=accel.models.tiny("llama"), samples=x, sparsity=0.6, progress=False)
    assert Artifact.load(out).configs[0].sparsity == 0.5
    calibrate_prune(str(out), model=accel.models.tiny("llama"), samples=x, sparsity=0.6, progress=False,
                    overwrite=True)
    assert Artifact.load(out).configs[0].sparsity == 0.6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
