"""Kill-and-resume: a real SIGKILL of a calibration subprocess at a seeded random layer, then the
same command again, gives an artifact whose tensors are byte-equal to an uninterrupted run's; a
checkpoint left by another model (or other settings / data) is not reused, and a truncated layer
checkpoint is recomputed."""
import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _calib_child as child
from accel.artifact import TENSORS_NAME
from accel.calibrate.prune import prune_model
from accel.configs.prune import PruneConfig

CHILD = Path(__file__).with_name("_calib_child.py")
N_LAYERS = 4


def _run_child(method, output, kill_at=None, extra=()):
    env = dict(os.environ)
    env.pop("ACCEL_TEST_KILL_AT_LAYER", None)
    if kill_at is not None:
        env["ACCEL_TEST_KILL_AT_LAYER"] = str(kill_at)
    env["PYTHONPATH"] = os.pathsep.join([str(CHILD.parent), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(CHILD), method, str(output), *extra], env=env,
                          capture_output=True, text=True, timeout=120)


def _ckpt_dir(method, output: Path) -> Path:
    return Path(str(output) + ".partial")


def _layer_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("layer_*.safetensors")) if d.is_dir() else []


def _reference(method, output: Path, model_seed=0, perturb=False) -> bytes:
    """The uninterrupted run, in this process (one thread, like the child)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        child.run(method, str(output), model_seed, perturb)
    finally:
        torch.set_num_threads(n)
    return (output / TENSORS_NAME).read_bytes()


def _calibration(output: Path) -> dict:
    from accel.artifact import Artifact
    return Artifact.load(output).calibration


@pytest.mark.parametrize("method", ["wanda", "dsnot", "gqsa"])
def test_sigkill_then_rerun_is_byte_equal(method, tmp_path):
    k = random.Random(f"kill-{method}-42").randint(1, N_LAYERS - 1)
    out = tmp_path / "art"
    killed = _run_child(method, out, kill_at=k)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists()
    assert _layer_files(_ckpt_dir(method, out)) == [f"layer_{i:03d}.safetensors" for i in range(k)]
    again = _run_child(method, out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _calibration(out)["resumed_layers"] == k
    ref = _reference(method, tmp_path / "ref")
    assert (out / TENSORS_NAME).read_bytes() == ref
    assert not _ckpt_dir(method, out).exists()  # OUTPUT.partial is removed once the artifact is saved


@pytest.mark.parametrize("method,other", [("wanda", ["--model-seed", "1"]), ("gqsa", ["--perturb"])],
                         ids=["wanda-other-seed", "gqsa-same-embeddings-other-decoder-weight"])
def test_checkpoint_of_another_model_is_not_reused(method, other, tmp_path):
    out = tmp_path / "art"
    killed = _run_child(method, out, kill_at=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(_layer_files(_ckpt_dir(method, out))) == 2
    second = _run_child(method, out, extra=other)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "model" in second.stderr and "starting fresh" in second.stderr, second.stderr[-2000:]
    assert _calibration(out)["resumed_layers"] == 0
    seed = 1 if "--model-seed" in other else 0
    ref = _reference(method, tmp_path / "ref", model_seed=seed, perturb="--perturb" in other)
    assert (out / TENSORS_NAME).read_bytes() == ref


# ---- in-process: other settings / data, truncated checkpoints --------------------------------
def _prune(ck, stop_after=None, sparsity=0.5, samples=None):
    model, x = child.build()
    x = x if samples is None else samples
    info = prune_model(model, PruneConfig(sparsity=sparsity), x, batch_size=2, checkpoint_dir=ck, progress=False,
                       stop_after=stop_after)
    return info


@pytest.mark.parametrize("change,what", [("sparsity", "config"), ("samples", "calibration data")])
def test_other_settings_or_data_start_fresh_and_say_so(change, what, tmp_path, caplog):
    _prune(tmp_path / "ck", stop_after=2)
    kw = {"sparsity": 0.6} if change == "sparsity" else {"samples": torch.randint(0, 512, (4, 16))}
    fresh = _prune(None, **kw)
    with caplog.at_level(logging.WARNING, logger="accel.calibrate.checkpoint"):
        again = _prune(tmp_path / "ck", **kw)
    assert again.run.resumed_layers == 0
    assert what in caplog.text and "starting fresh" in caplog.text, caplog.text
    for n in fresh.masks:
        assert torch.equal(fresh.masks[n], again.masks[n]), n


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_corrupt_layer_checkpoint_is_named_and_recomputed(how, tmp_path, caplog):
    ref = _prune(None)
    ck = tmp_path / "ck"
    _prune(ck, stop_after=3)
    bad = ck / "layer_001.safetensors"
    data = bad.read_bytes()
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00" * 64, "empty": b""}[how])
    with caplog.at_level(logging.WARNING, logger="accel.calibrate.checkpoint"):
        again = _prune(ck)
    assert "layer_001.safetensors" in caplog.text and "recomput" in caplog.text, caplog.text
    assert again.run.resumed_layers == 1  # layer 0 only: from the bad layer on, everything is recomputed
    for n in ref.masks:
        assert torch.equal(ref.masks[n], again.masks[n]), n


def test_rsparse_evo_state_of_another_model_is_not_reused(tmp_path, caplog):
    import accel
    from accel.calibrate.rsparse import calibrate_rsparse
    from accel.calibrate.rsparse_search import EvoSettings
    from accel.configs.rsparse import RSparseConfig
    from test_bad_input_calibration import CharTok

    cfg = RSparseConfig(sparsity=0.5, search="evo")
    kw = dict(n_samples=2, seq_len=16, greedy_tokens=16, evo=EvoSettings(population=2, generations=1), progress=False)
    calibrate_rsparse(accel.models.tiny("llama", seed=0), CharTok(), cfg, checkpoint_dir=tmp_path, **kw)
    assert list(tmp_path.glob("evo_*.json"))
    fresh = calibrate_rsparse(accel.models.tiny("llama", seed=1), CharTok(), cfg, **kw)
    with caplog.at_level(logging.WARNING):
        again = calibrate_rsparse(accel.models.tiny("llama", seed=1), CharTok(), cfg, checkpoint_dir=tmp_path, **kw)
    assert "evolutionary search state" in caplog.text and "starting fresh" in caplog.text, caplog.text
    assert again.calibration["evo_history"] == fresh.calibration["evo_history"]
    for k, v in fresh.tensors.items():
        assert torch.equal(v, again.tensors[k]), k


def test_temp_files_a_kill_left_are_cleared_and_resume_still_equal(tmp_path):
    ref = _prune(None)
    ck = tmp_path / "ck"
    _prune(ck, stop_after=2)
    (ck / "layer_002.safetensors.tmp").write_bytes(b"half a file")  # killed mid-write
    again = _prune(ck)
    assert again.run.resumed_layers == 2
    assert not list(ck.glob("*.tmp"))
    for n in ref.masks:
        assert torch.equal(ref.masks[n], again.masks[n]), n
