"""Double Sparsity's `min_context` from the command line (issue 16): it could only be changed from
Python, and its default keeps decode dense below 8K tokens."""
import json

import pytest

import accel
from accel.cli import main
from accel.configs.double_sparsity import DoubleSparsityConfig


class _CharTok:
    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        from types import SimpleNamespace

        import torch

        ids = [ord(c) % 512 for c in text]
        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)


@pytest.fixture
def tiny_load(monkeypatch):
    loads = []

    def load(name, dtype="float32", **kw):
        loads.append(name)
        return accel.models.tiny("llama"), _CharTok()
    monkeypatch.setattr(accel.models, "load", load)
    return loads


@pytest.mark.parametrize("extra,want", [(["--min-context", "0"], 0), (["--min-context", "2048"], 2048),
                                        ([], DoubleSparsityConfig.min_context)])
def test_calibrate_min_context_reaches_the_artifact(extra, want, tmp_path, capsys, tiny_load):
    out = tmp_path / "ds"
    rc = main(["calibrate", "double-sparsity", "--model", "tiny-llama", "--output", str(out),
               "--num-calibration-samples", "2", "--max-seq-length", "32", "--heavy-channels", "4", "--json"] + extra)
    res = capsys.readouterr()
    assert rc == 0, res.err
    assert json.loads(res.out.strip().splitlines()[-1])["min_context"] == want
    assert accel.Artifact.load(out).configs[0].min_context == want


def test_calibrate_negative_min_context_is_one_line_and_writes_nothing(tmp_path, capsys, tiny_load):
    rc = main(["calibrate", "double-sparsity", "--model", "tiny-llama", "--output", str(tmp_path / "ds"),
               "--min-context", "-1"])
    err = capsys.readouterr().err
    assert rc == 2 and "min_context" in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == [] and tiny_load == []


def test_ds_retrieval_passes_min_context(monkeypatch, capsys):
    import accel.eval.ds_cli as ds_cli
    import accel.eval.ds_retrieval as ds_retrieval

    seen = {}

    def fake_run(model, tok, art, **kw):
        seen.update(kw)
        return {}
    monkeypatch.setattr(ds_cli, "_load", lambda *a: (None, None, accel.Artifact(configs=[DoubleSparsityConfig()])))
    monkeypatch.setattr(ds_retrieval, "run_retrieval", fake_run)
    monkeypatch.setattr(ds_retrieval, "format_retrieval", lambda r: "")
    assert main(["eval", "ds-retrieval", "--min-context", "1024"]) == 0
    assert seen["min_context"] == 1024
    assert main(["eval", "ds-retrieval"]) == 0
    assert seen["min_context"] == 0


def _ds_artifact(tmp_path, min_context=8192):
    model = accel.models.tiny("llama")
    cfg = DoubleSparsityConfig(heavy_channels=4, min_context=min_context)
    import torch

    data = torch.tensor([[1 + (i * 7 + j) % 200 for j in range(32)] for i in range(2)])
    art = accel.calibrate(model, cfg, data=data,
                          progress=False)
    path = art.save(tmp_path / "ds")
    return model, path


def test_patch_min_context_overrides_the_artifact(tmp_path):
    model, path = _ds_artifact(tmp_path)
    accel.patch(model, path, min_context=0)
    assert [c.min_context for c in accel.patches.core.state_of(model).methods] == [0]
    accel.unpatch(model)
    accel.patch(model, path)
    assert [c.min_context for c in accel.patches.core.state_of(model).methods] == [8192]


def test_patch_min_context_bad_values_are_refused(tmp_path):
    model, path = _ds_artifact(tmp_path)
    with pytest.raises(accel.ConfigError, match="min_context"):
        accel.patch(model, path, min_context=-1)
    assert not accel.is_patched(model)
    from accel.configs.prune import PruneConfig
    with pytest.raises(accel.ConfigError, match="min_context apply to double-sparsity"):
        accel.patch(model, PruneConfig(init="magnitude", sparsity=0.5), min_context=0)
