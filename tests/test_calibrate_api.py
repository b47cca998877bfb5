"""`accel.calibrate`: one calling shape for every method, one set of defaults, checkpoints on by
default and removed after success, the model left unchanged, data as spec / tensor / strings."""
import inspect
import subprocess
import sys

import pytest
import torch

import accel
import accel.data as D
from accel.calibrate.registry import METHOD_DEFAULTS, calibrators, default_spec
from accel.calibrate.runner import CalibrationError
from accel.configs import ConfigError
from accel.configs.double_sparsity import DoubleSparsityConfig
from accel.configs.gqsa import GQSAConfig
from accel.configs.prune import PruneConfig
from accel.configs.rsparse import RSparseConfig
from accel.data import CalibrationSpec, DataError
from accel.errors import AccelError
from test_bad_input_calibration import CharTok

CONFIGS = {
    "wanda": lambda: PruneConfig(sparsity=0.5),
    "dsnot": lambda: PruneConfig(sparsity=0.5, dsnot=True, max_cycles=5),
    "magnitude": lambda: PruneConfig(init="magnitude", sparsity=0.5),
    "gqsa": lambda: GQSAConfig(bits=4, sparsity=0.5, group_size=16, allocation="uniform", bqpo_steps=1),
    "rsparse": lambda: RSparseConfig(sparsity=0.5),
    "double-sparsity": lambda: DoubleSparsityConfig(heavy_channels=4),
}
LAYERWISE = ("wanda", "gqsa", "rsparse")  # methods that checkpoint per layer (dsnot: the same code path as wanda)


def x(n=2, L=16):
    return torch.randint(0, 512, (n, L), generator=torch.Generator().manual_seed(42))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed[:3]


def test_the_four_methods_register_one_calling_shape():
    cals = calibrators()
    assert {"double-sparsity", "prune", "gqsa", "rsparse"} <= set(cals)
    for method, cal in cals.items():
        ps = inspect.signature(cal.fn).parameters
        assert list(ps)[:3] == ["model", "config", "samples"], method
        for kw in ("spec", "checkpoint_dir", "progress"):
            assert ps[kw].kind is inspect.Parameter.KEYWORD_ONLY, (method, kw)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_method_calibrates_through_accel_calibrate_and_leaves_the_model_unchanged(name, tmp_path):
    model = accel.models.tiny("llama")
    before = _state(model)
    cfg = CONFIGS[name]()
    art = accel.calibrate(model, cfg, x(), tmp_path / "art", progress=False)
    _assert_same(model, before)
    assert art.path == tmp_path / "art" and art.configs[0].method == cfg.method and art.tensors
    assert accel.Artifact.load(tmp_path / "art").configs[0].to_dict() == cfg.to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no checkpoints left behind
    # The artifact was made for the dense model: it patches a fresh copy.
    fresh = accel.models.tiny("llama")
    if name != "double-sparsity":  # DS patches attention, checked by its own tests
        with accel.patched(fresh, tmp_path / "art"):
            assert accel.report(fresh).rows


def test_gqsa_restores_the_model_when_calibration_fails(monkeypatch):
    import accel.calibrate.gqsa as G

    def boom(*a, **k):
        raise RuntimeError("stage 2 failed")
    monkeypatch.setattr(G, "e2e_oqp", boom)
    model = accel.models.tiny("llama")
    before = _state(model)
    with pytest.raises(RuntimeError, match="stage 2 failed"):
        accel.calibrate(model, CONFIGS["gqsa"](), x(), progress=False)
    _assert_same(model, before)


def test_old_entry_points_leave_the_model_unchanged_too():
    from accel.calibrate.gqsa import calibrate_gqsa

    model = accel.models.tiny("llama")
    before = _state(model)
    calibrate_gqsa(model, None, CONFIGS["gqsa"](), samples=x(), progress=False)
    _assert_same(model, before)


def test_defaults_come_from_calibration_spec(monkeypatch):
    seen = []

    def fake(tok, spec=None, **kw):
        seen.append(spec)
        return x(2, 16)
    monkeypatch.setattr(D, "calibration_samples", fake)
    for name in ("wanda", "gqsa", "rsparse", "double-sparsity"):
        accel.calibrate(accel.models.tiny("llama"), CONFIGS[name](), tokenizer=CharTok(), progress=False)
    # Written out: CalibrationSpec's defaults, and the three documented per-method departures.
    assert seen[0] == CalibrationSpec() == CalibrationSpec(source="wiki", n_samples=128, seq_len=512, seed=0)
    assert seen[1] == CalibrationSpec(n_samples=16, seq_len=256)
    assert seen[2] == CalibrationSpec(n_samples=8, seq_len=512)
    assert seen[3] == CalibrationSpec(n_samples=32, seq_len=512)
    assert METHOD_DEFAULTS == {"double-sparsity": {"n_samples": 32}, "gqsa": {"n_samples": 16, "seq_len": 256},
                               "rsparse": {"n_samples": 8}}
    seen.clear()
    accel.calibrate(accel.models.tiny("llama"), CONFIGS["gqsa"](), tokenizer=CharTok(), num_calibration_samples=3,
                    max_seq_length=16, seed=7, progress=False)
    assert seen == [CalibrationSpec(n_samples=3, seq_len=16, seed=7)]


def test_old_entry_points_use_the_same_defaults(monkeypatch):
    from accel.calibrate.double_sparsity import calibrate_double_sparsity
    from accel.calibrate.gqsa import calibrate_gqsa
    from accel.calibrate.rsparse import calibrate_rsparse

    seen = []

    def fake(tok, spec=None, **kw):
        seen.append(spec)
        return x(2, 16)
    for mod in ("accel.calibrate.double_sparsity", "accel.calibrate.gqsa", "accel.calibrate.rsparse"):
        if hasattr(sys.modules[mod], "calibration_samples"):
            monkeypatch.setattr(sys.modules[mod], "calibration_samples", fake)
    monkeypatch.setattr(D, "calibration_samples", fake)
    calibrate_double_sparsity(accel.models.tiny("llama"), CharTok(), CONFIGS["double-sparsity"](), progress=False)
    calibrate_gqsa(accel.models.tiny("llama"), CharTok(), CONFIGS["gqsa"](), progress=False)
    calibrate_rsparse(accel.models.tiny("llama"), CharTok(), CONFIGS["rsparse"](), progress=False)
    assert [(s.n_samples, s.seq_len) for s in seen] == [(32, 512), (16, 256), (8, 512)]
    assert [default_spec(m) for m in ("double-sparsity", "gqsa", "rsparse")] == seen


@pytest.mark.parametrize("name", LAYERWISE)
@pytest.mark.parametrize("with_output", [True, False], ids=["output", "no-output"])
def test_checkpoints_exist_during_the_run_and_are_removed_after_success(name, with_output, tmp_path, monkeypatch):
    from accel.calibrate.checkpoint import CheckpointDir

    dirs = []
    save = CheckpointDir.save

    def spy(self, i, tensors):
        save(self, i, tensors)
        assert self.file(i).is_file()
        dirs.append(self.path)
    monkeypatch.setattr(CheckpointDir, "save", spy)
    out = tmp_path / "art" if with_output else None
    accel.calibrate(accel.models.tiny("llama"), CONFIGS[name](), x(), out, progress=False)
    assert len(dirs) == 4  # one checkpoint per decoder layer
    root = dirs[0].parent if name == "rsparse" else dirs[0]  # R-Sparse: <dir>/stats
    if with_output:
        assert root == tmp_path / "art.partial"
    else:
        assert root.name.startswith("accel-calibrate-")
    assert not root.exists()


def test_an_interrupted_run_resumes_from_output_partial(tmp_path, monkeypatch):
    import accel.calibrate.prune as P

    real = P.run_layerwise

    def interrupted(*a, **k):  # two layers done and checkpointed, then the user presses Ctrl-C
        real(*a, **{**k, "stop_after": 2})
        raise KeyboardInterrupt
    monkeypatch.setattr(P, "run_layerwise", interrupted)
    with pytest.raises(KeyboardInterrupt):
        accel.calibrate(accel.models.tiny("llama"), CONFIGS["wanda"](), x(), tmp_path / "art", progress=False)
    assert sorted(p.name for p in (tmp_path / "art.partial").iterdir()) == [
        "layer_000.safetensors", "layer_001.safetensors", "run_key.json"]
    monkeypatch.setattr(P, "run_layerwise", real)
    art = accel.calibrate(accel.models.tiny("llama"), CONFIGS["wanda"](), x(), tmp_path / "art", progress=False)
    assert art.calibration["resumed_layers"] == 2
    ref = accel.calibrate(accel.models.tiny("llama"), CONFIGS["wanda"](), x(), progress=False)
    for k, v in ref.tensors.items():
        assert torch.equal(v, art.tensors[k]), k
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_data_as_strings_tensor_and_spec(monkeypatch):
    texts = ["The quick brown fox jumps over the lazy dog. " * 4, "Pack my box with five dozen liquor jugs. " * 4]
    art = accel.calibrate(accel.models.tiny("llama"), CONFIGS["wanda"](), texts, tokenizer=CharTok(),
                          max_seq_length=32, progress=False)
    # CharTok: one token per character; the texts and their "\n\n" separators cut into windows of 32.
    n = sum(len(t) + 2 for t in texts) // 32
    assert art.calibration["data"] == {"source": "texts", "n_samples": n, "seq_len": 32, "seed": 0,
                                       "split": "calibration"}
    art = accel.calibrate(accel.models.tiny("llama"), CONFIGS["wanda"](), x(3, 20), num_calibration_samples=2,
                          max_seq_length=12, progress=False)
    assert art.calibration["data"]["source"] == "given"
    assert (art.calibration["data"]["n_samples"], art.calibration["data"]["seq_len"]) == (2, 12)
    art = accel.calibrate(accel.models.tiny("llama"), CONFIGS["wanda"](), CalibrationSpec(n_samples=2, seq_len=16),
                          tokenizer=CharTok(), progress=False)
    assert art.calibration["data"] == {**CalibrationSpec(n_samples=2, seq_len=16).to_dict()}


BAD = {
    "int": (42, {}, DataError, "data must be None, a CalibrationSpec"),
    "empty-list": ([], {}, DataError, "empty"),
    "list-with-int": (["a text", 3], {}, DataError, "data must be"),
    "float-tensor": (torch.rand(2, 16), {}, CalibrationError, "integer token ids"),
    "1d-tensor": (torch.arange(16), {}, CalibrationError, r"\[N, L\]"),
    "ids-past-vocab": (torch.full((2, 16), 9999), {}, CalibrationError, "vocab_size"),
    "texts-no-tokenizer": (["some text " * 20], {"tokenizer": None}, DataError, "needs a tokenizer"),
    "texts-too-short": (["short"], {"max_seq_length": 64}, DataError, "give 7 tokens"),
    "too-few-rows": (x(2, 16), {"num_calibration_samples": 5}, DataError, "num_calibration_samples=5"),
    "spec-no-tokenizer": (None, {"tokenizer": None}, DataError, "needs tokenizer"),
    "bad-n": (x(), {"num_calibration_samples": 0}, DataError, "num_calibration_samples must be"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_is_an_accel_error_and_writes_nothing(case, tmp_path):
    data, kw, err, match = BAD[case]
    kw = {"tokenizer": CharTok(), **kw}
    model = accel.models.tiny("llama")
    before = _state(model)
    with pytest.raises(err, match=match) as e:
        accel.calibrate(model, CONFIGS["wanda"](), data, tmp_path / "art", progress=False, **kw)
    assert isinstance(e.value, AccelError)
    assert list(tmp_path.iterdir()) == []
    _assert_same(model, before)


@pytest.mark.parametrize("cfg,match", [("prune", "must be a MethodConfig"),
                                       ([], "at least one config")])
def test_bad_config_is_a_config_error(cfg, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        accel.calibrate(accel.models.tiny("llama"), cfg, x(), tmp_path / "art", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_targets_fail_before_any_data_is_drawn(monkeypatch):
    from accel.patches.core import TargetError

    monkeypatch.setattr(D, "calibration_samples", lambda *a, **k: pytest.fail("data drawn before the check"))
    with pytest.raises(TargetError):
        accel.calibrate(accel.models.tiny("llama"), PruneConfig(targets=["re:nope_proj"]), tokenizer=CharTok(),
                        progress=False)


def test_rsparse_greedy_grid_follows_the_calibration_set():
    # 2 x 16 = 32 calibration tokens: the grid cannot use more (it recorded 512 before).
    art = accel.calibrate(accel.models.tiny("llama"), CONFIGS["rsparse"](), x(2, 16), progress=False)
    assert art.calibration["greedy_tokens"] == 32


def test_import_accel_gives_a_callable_calibrate_and_stays_light():
    code = ("import sys, accel; assert callable(accel.calibrate), type(accel.calibrate); "
            "import accel.calibrate.prune; assert callable(accel.calibrate); "
            "heavy = [m for m in ('accel.calibrate.api', 'accel.calibrate.gqsa', 'accel.calibrate.rsparse') "
            "if m in sys.modules]; assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
