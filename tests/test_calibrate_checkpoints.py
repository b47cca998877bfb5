"""Checkpoint directories and calibration records (fast: tiny models only): R-Sparse refuses a
checkpoint directory holding a user's files, accel removes only directories it made, R-Sparse
hashes the weights once per run, a given model keeps its name in a prune artifact, and the
method CLIs take their option defaults from the config dataclasses."""
import dataclasses

import pytest
import torch

import accel
from accel.artifact import Artifact
from accel.calibrate import checkpoint as ckpt_mod
from accel.calibrate import rsparse as rsparse_mod
from accel.calibrate.runner import CalibrationError
from accel.configs.gqsa import GQSAConfig
from accel.configs.prune import PruneConfig
from accel.configs.rsparse import RSparseConfig


def _samples(n=2, t=16):
    return torch.randint(0, 512, (n, t), generator=torch.Generator().manual_seed(42))


# (a) ------------------------------------------------------------------------------------------
def test_rsparse_refuses_a_checkpoint_dir_holding_user_files(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("my notes")
    with pytest.raises(CalibrationError, match="notes.txt") as e:
        accel.calibrate(accel.models.tiny("llama", seed=0), RSparseConfig(sparsity=0.5), _samples(),
                        checkpoint_dir=d, progress=False)
    assert str(d) in str(e.value)
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]  # nothing written before refusing
    assert (d / "notes.txt").read_text() == "my notes"


# (b) ------------------------------------------------------------------------------------------
def test_a_user_made_empty_checkpoint_dir_is_kept(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    accel.calibrate(accel.models.tiny("llama", seed=0), PruneConfig(sparsity=0.5), _samples(),
                    checkpoint_dir=d, progress=False)
    assert d.is_dir() and list(d.iterdir()) == []


def test_a_checkpoint_dir_accel_made_is_removed(tmp_path):
    d = tmp_path / "ck"
    accel.calibrate(accel.models.tiny("llama", seed=0), PruneConfig(sparsity=0.5), _samples(),
                    checkpoint_dir=d, progress=False)
    assert not d.exists()


# (c) ------------------------------------------------------------------------------------------
def test_rsparse_hashes_the_weights_once_per_run(tmp_path, monkeypatch):
    from accel.calibrate.rsparse_search import EvoSettings
    from accel.data import CalibrationSpec

    calls = []
    real = ckpt_mod.weights_digest

    def counting(model):
        calls.append(1)
        return real(model)

    monkeypatch.setattr(ckpt_mod, "weights_digest", counting)
    monkeypatch.setattr(rsparse_mod, "weights_digest", counting, raising=False)
    x = _samples()
    rsparse_mod.calibrate_rsparse_model(
        accel.models.tiny("llama", seed=0), RSparseConfig(sparsity=0.5, search="evo"), x,
        spec=CalibrationSpec(source="given", n_samples=2, seq_len=16), checkpoint_dir=tmp_path / "ck",
        progress=False, greedy_tokens=16, evo=EvoSettings(population=2, generations=1))
    assert len(calls) == 1


# (d) ------------------------------------------------------------------------------------------
def test_prune_artifact_of_a_given_model_names_that_model(tmp_path):
    from accel.calibrate.prune_artifact import calibrate_prune

    out = tmp_path / "art"
    calibrate_prune(str(out), model=accel.models.tiny("llama", seed=0), samples=_samples(), progress=False,
                    batch_size=2)
    assert Artifact.load(out).calibration["model"] == "tiny-llama"  # its accel_source, not "smollm2-135m"


# (g) ------------------------------------------------------------------------------------------
OPTIONS = [("gqsa", GQSAConfig, ["bits", "sparsity", "group_size", "tile_rows", "init", "allocation", "owl_lambda",
                                 "bqpo_steps", "bqpo_lr", "bqpo_batch", "e2e_steps", "e2e_lr"]),
           ("rsparse", RSparseConfig, ["sparsity", "search", "mode", "sparse_share"]),
           ("dsnot", PruneConfig, ["init", "max_cycles", "threshold"])]


def _defaults(cmd):
    from accel.cli import build

    p = build().parser
    for word in ("calibrate", cmd):
        p = next(a for a in p._actions if a.dest in ("command", "calibrate_command")).choices[word]
    return {a.dest: a.default for a in p._actions}


@pytest.mark.parametrize("cmd,cls,names", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_cli_defaults_are_the_config_defaults(cmd, cls, names, monkeypatch):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    got = _defaults(cmd)
    for n in names:
        assert got[n] == fields[n].default, n
    # And they follow the dataclass: a changed config default is the CLI's default too.
    marks = {n: object() for n in names}
    for n, m in marks.items():
        monkeypatch.setattr(fields[n], "default", m)
    got = _defaults(cmd)
    assert [n for n in names if got[n] is not marks[n]] == []
