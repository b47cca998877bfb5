"""Recipes: stages calibrated in order, each on the model patched with the earlier ones, saved
as one artifact that `accel.patch` applies whole; stacking refused before any work; resume per stage."""
import pytest
import torch

import accel
from accel.artifact import ArtifactError
from accel.calibrate import registry
from accel.calibrate.runner import CalibrationError
from accel.configs import ConfigError
from accel.configs.double_sparsity import DoubleSparsityConfig
from accel.configs.gqsa import GQSAConfig
from accel.configs.prune import PruneConfig
from accel.patches.core import PatchConflictError


def ds(**kw):
    # Sparse enough on a 64-token window that every sparse layer's scoring differs from dense.
    return DoubleSparsityConfig(**{"heavy_channels": 4, "budget": 0.25, "sink": 1, "recent": 2, "n_dense": 1, **kw})


def wanda(**kw):
    return PruneConfig(sparsity=0.5, **kw)


def gqsa(**kw):
    return GQSAConfig(**{"bits": 4, "sparsity": 0.5, "group_size": 16, "allocation": "uniform", "bqpo_steps": 1,
                         **kw})


def x(n=2, L=64, seed=42):
    return torch.randint(0, 512, (n, L), generator=torch.Generator().manual_seed(seed))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _logits(model, ids):
    with torch.no_grad():
        # use_cache=False: a scoring forward (with a cache, DS prefill is dense by design).
        return model(ids, use_cache=False).logits


def _count(monkeypatch, method, fail=None):
    """Wrap `method`'s registered calibrator: count its calls, optionally raise `fail` instead."""
    old = registry.get_calibrator(method)
    calls = []

    def fn(model, config, samples, **kw):
        calls.append(config)
        if fail is not None:
            raise fail
        return old.fn(model, config, samples, **kw)

    monkeypatch.setitem(registry._REGISTRY, method, registry.Calibrator(method, fn, old.needs_data, old.check))
    return calls


def test_recipe_makes_one_artifact_that_patches_whole_and_leaves_the_model_unchanged(tmp_path):
    model = accel.models.tiny("llama")
    before, ids = _state(model), x(1, 48, seed=7)
    dense = _logits(model, ids)
    art = accel.calibrate(model, [ds(), wanda()], x(), tmp_path / "art", progress=False)
    assert not accel.is_patched(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no .partial left
    loaded = accel.Artifact.load(tmp_path / "art")
    assert [c.method for c in loaded.configs] == ["double-sparsity", "prune"]
    assert {k.split("/")[0] for k in loaded.tensors} == {"double-sparsity", "prune"}
    with accel.patched(model, tmp_path / "art"):
        kinds = {(r["method"], r["kind"]) for r in accel.report(model).rows}
        both = _logits(model, ids)
    assert {("double-sparsity", "attention"), ("prune", "linear")} <= kinds
    parts = {}
    for i, method in enumerate(("double-sparsity", "prune")):
        part = accel.Artifact(configs=[loaded.configs[i]], tensors=loaded.tensors, fingerprint=loaded.fingerprint)
        with accel.patched(model, part):
            parts[method] = _logits(model, ids)
    assert torch.isfinite(both).all()
    for method, out in parts.items():
        assert not torch.equal(both, out), method
        assert not torch.equal(out, dense), method
    assert torch.equal(_logits(model, ids), dense)


def test_a_later_stage_is_fitted_to_double_sparsity_scoring_outputs(tmp_path, monkeypatch):
    """Stage 2's calibration forwards run through DS's every-query-row scoring, even when the saved
    config says score_mode="dense"; its masks are the ones Wanda finds on the DS-patched model."""
    model = accel.models.tiny("llama")
    seen = []
    old = registry.get_calibrator("prune")

    def spy(m, config, samples, **kw):
        handlers = [layer.self_attn.__dict__.get("_accel_attention") for layer in m.model.layers]
        art = old.fn(m, config, samples, **kw)
        seen.append([h.counts["sparse_score"] if "sparse_score" in getattr(h, "counts", {}) else None
                     for h in handlers])
        return art

    monkeypatch.setitem(registry._REGISTRY, "prune", registry.Calibrator("prune", spy, old.needs_data, old.check))
    art = accel.calibrate(model, accel.Recipe([ds(score_mode="dense"), wanda()]), x(), progress=False)
    assert art.configs[0].score_mode == "dense"  # the saved config is the user's
    # Layer 0 is n_dense (a dense handler, no sparse scoring); every sparse layer scored sparsely during stage 2.
    assert seen[0][0] is None and all(c > 0 for c in seen[0][1:]), seen
    monkeypatch.setitem(registry._REGISTRY, "prune", old)
    alone = accel.calibrate(model, wanda(), x(), progress=False)
    ds_art = accel.calibrate(model, ds(), x(), progress=False)
    with accel.patched(model, ds_art):
        on_ds = accel.calibrate(model, wanda(), x(), progress=False)
    masks = {k: v for k, v in art.tensors.items() if k.startswith("prune/")}
    assert masks.keys() == on_ds.tensors.keys()
    assert all(torch.equal(masks[k], on_ds.tensors[k]) for k in masks)
    # Layer 0's inputs do not depend on attention; later layers' do.
    assert any(not torch.equal(masks[k], alone.tensors[k]) for k in masks if ".layers.3." in k)


def test_gqsa_stage_two_trains_through_double_sparsity(tmp_path):
    art = accel.calibrate(accel.models.tiny("llama"), [ds(), gqsa(e2e_steps=2, e2e_batch=1)], x(), progress=False)
    assert [c.method for c in art.configs] == ["double-sparsity", "gqsa"]
    assert art.calibration["stages"][1]["stage2_seconds"] >= 0


@pytest.mark.parametrize("stages,names", [
    ([wanda(), gqsa()], ("stage 2 (gqsa)", "stage 1 (prune)")),
    ([gqsa(targets=["re:mlp"]), wanda(targets=["re:up_proj"])], ("stage 2 (prune)", "stage 1 (gqsa)", "up_proj")),
])
def test_two_weight_methods_on_one_linear_are_refused_before_any_work(stages, names, tmp_path, monkeypatch):
    calls = [_count(monkeypatch, m) for m in ("prune", "gqsa")]
    import accel.data as D

    monkeypatch.setattr(D, "calibration_samples", lambda *a, **k: pytest.fail("data drawn before the check"))
    with pytest.raises(PatchConflictError) as e:
        accel.calibrate(accel.models.tiny("llama"), stages, None, tmp_path / "art", tokenizer=object())
    for n in names:
        assert n in str(e.value)
    assert calls == [[], []] and list(tmp_path.iterdir()) == []


def test_weight_methods_on_disjoint_linears_compose(tmp_path):
    model = accel.models.tiny("llama")
    art = accel.calibrate(model, [wanda(targets=["re:mlp"]), gqsa(targets=["re:self_attn"])], x(), progress=False)
    with accel.patched(model, art):
        by = {r["module"]: r["method"] for r in accel.report(model).rows}
    assert by["model.layers.0.mlp.up_proj"] == "prune" and by["model.layers.0.self_attn.q_proj"] == "gqsa"


def test_two_attention_methods_and_a_repeated_method_are_refused(tmp_path):
    import toy_keep_last  # noqa: F401  (a second attention method)

    KeepLast = accel.configs.get_config_class("keep-last")
    with pytest.raises(PatchConflictError, match=r"stage 2 \(keep-last\).*stage 1 \(double-sparsity\).*attention"):
        accel.calibrate(accel.models.tiny("llama"), [ds(), KeepLast(n=8)], x(), tmp_path / "a")
    with pytest.raises(ConfigError, match="stages 1 and 2 are both double-sparsity"):
        accel.calibrate(accel.models.tiny("llama"), [ds(), ds(budget=0.5)], x(), tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_output_is_refused_before_any_work(tmp_path, monkeypatch):
    calls = _count(monkeypatch, "double-sparsity")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ArtifactError, match="not an accel artifact"):
        accel.calibrate(accel.models.tiny("llama"), [ds(), wanda()], x(), mine, overwrite=True)
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert (mine / "notes.txt").read_text() == "keep"


def test_failed_stage_writes_nothing_and_a_rerun_skips_the_finished_stage(tmp_path, monkeypatch):
    model, out = accel.models.tiny("llama"), tmp_path / "art"
    ds_calls = _count(monkeypatch, "double-sparsity")
    _count(monkeypatch, "prune", fail=RuntimeError("stage 2 blew up"))
    with pytest.raises(RuntimeError, match="stage 2 blew up"):
        accel.calibrate(model, [ds(), wanda()], x(), out, progress=False)
    assert not out.exists() and not accel.is_patched(model) and len(ds_calls) == 1
    assert (tmp_path / "art.partial" / "stage_00" / "artifact" / "accel_config.json").is_file()
    monkeypatch.undo()
    ds_calls, prune_calls = _count(monkeypatch, "double-sparsity"), _count(monkeypatch, "prune")
    art = accel.calibrate(model, [ds(), wanda()], x(), out, progress=False)
    assert (len(ds_calls), len(prune_calls)) == (0, 1)  # stage 1 reused from its checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    fresh = accel.calibrate(model, [ds(), wanda()], x(), progress=False)
    assert fresh.tensors.keys() == art.tensors.keys()
    assert all(torch.equal(fresh.tensors[k], art.tensors[k]) for k in art.tensors)


def test_interrupted_stage_resumes_from_its_layer_checkpoints(tmp_path, monkeypatch):
    import accel.calibrate.checkpoint as C

    model, out = accel.models.tiny("llama"), tmp_path / "art"
    save = C.CheckpointDir.save

    def killed_after_two(self, i, tensors):
        save(self, i, tensors)
        if i == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(C.CheckpointDir, "save", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        accel.calibrate(model, [ds(), wanda()], x(), out, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "art.partial" / "stage_01" / "layers").iterdir()) == [
        "layer_000.safetensors", "layer_001.safetensors", "run_key.json"]
    ds_calls = _count(monkeypatch, "double-sparsity")
    art = accel.calibrate(model, [ds(), wanda()], x(), out, progress=False)
    assert ds_calls == [] and art.calibration["stages"][1]["resumed_layers"] == 2
    fresh = accel.calibrate(model, [ds(), wanda()], x(), progress=False)
    assert all(torch.equal(fresh.tensors[k], art.tensors[k]) for k in art.tensors)


def test_other_data_recomputes_every_stage(tmp_path, monkeypatch, caplog):
    out = tmp_path / "art"
    _count(monkeypatch, "prune", fail=RuntimeError("stop"))
    with pytest.raises(RuntimeError):
        accel.calibrate(accel.models.tiny("llama"), [ds(), wanda()], x(), out, progress=False)
    monkeypatch.undo()
    ds_calls = _count(monkeypatch, "double-sparsity")
    accel.calibrate(accel.models.tiny("llama"), [ds(), wanda()], x(seed=1), out, progress=False)
    assert len(ds_calls) == 1 and "different calibration data" in caplog.text


def test_a_stage_failing_on_bad_data_drops_only_its_own_checkpoints(tmp_path, monkeypatch):
    out = tmp_path / "art"
    _count(monkeypatch, "prune", fail=CalibrationError("decoder layer 2 produced NaN/inf activations"))
    with pytest.raises(CalibrationError):
        accel.calibrate(accel.models.tiny("llama"), [ds(), wanda()], x(), out, progress=False)
    assert sorted(p.name for p in (tmp_path / "art.partial").iterdir()) == ["stage_00"]
    assert not out.exists()


def test_an_already_patched_model_and_foreign_checkpoint_dirs_are_refused(tmp_path):
    model = accel.models.tiny("llama")
    with accel.patched(model, accel.calibrate(model, wanda(init="magnitude"), progress=False)):
        with pytest.raises(PatchConflictError, match="already patched"):
            accel.calibrate(model, [ds(), wanda()], x())
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "thesis.tex").write_text("x")
    with pytest.raises(CalibrationError, match="thesis.tex"):
        accel.calibrate(model, [ds(), wanda()], x(), checkpoint_dir=ck)
    assert sorted(p.name for p in ck.iterdir()) == ["thesis.tex"]


def test_gqsa_embedding_bits_claims_the_embedding_and_lm_head():
    """check_recipe / check_stack count what GQSA embedding_bits replaces besides the linears, so a
    weight stage on the lm_head conflicts before any calibration, not at patch time."""
    from accel.patches.stacking import planned_linears

    model = accel.models.tiny("llama")
    assert not {"lm_head", "model.embed_tokens"} & set(planned_linears(model, gqsa()))
    names = planned_linears(model, gqsa(embedding_bits=4, targets=["re:self_attn"]))
    assert {"lm_head", "model.embed_tokens"} <= set(names)
    assert not any("mlp" in n for n in names)
