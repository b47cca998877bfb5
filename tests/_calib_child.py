"""Child process for tests/test_resume.py: one calibration run on a tiny seeded model.

    python tests/_calib_child.py METHOD OUTPUT [--model-seed S] [--perturb]

METHOD: wanda | dsnot (prune artifacts) or gqsa (through accel.calibrate); checkpoints in
OUTPUT.partial, the default, removed after success. ACCEL_TEST_KILL_AT_LAYER=k: SIGKILL this
process right after layer k has been computed, before the runner checkpoints it (layers < k are
checkpointed). The hook lives here, not in library code. `build` is imported by the test, so the in-process reference run uses the
very same model, data and settings.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import torch

N_SAMPLES, SEQ_LEN = 4, 16


def build(model_seed: int = 0, perturb: bool = False):
    """(model, samples): tiny llama (4 decoder layers) and seeded token ids [4, 16]."""
    import accel

    model = accel.models.tiny("llama", seed=model_seed)
    if perturb:
        # Same embeddings and norms (so the same accel.artifact.fingerprint weights hash), one
        # decoder weight changed: only a hash of every weight tells the two models apart.
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    samples = torch.randint(0, 512, (N_SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(42))
    return model, samples


def gqsa_config():
    from accel.configs.gqsa import GQSAConfig

    return GQSAConfig(bits=4, sparsity=0.5, group_size=16, allocation="uniform", bqpo_steps=2)


def run(method: str, output: str, model_seed: int = 0, perturb: bool = False) -> None:
    model, samples = build(model_seed, perturb)
    if method in ("wanda", "dsnot"):
        from accel.calibrate.prune_cli import calibrate_prune

        calibrate_prune(output, init="wanda", dsnot=method == "dsnot", model_name="tiny-llama", sparsity=0.5,
                        model=model, samples=samples, batch_size=2, progress=False, max_cycles=5)
    elif method == "gqsa":
        import accel

        accel.calibrate(model, gqsa_config(), samples, output, progress=False)
    else:
        raise SystemExit(f"unknown method {method!r}")


def _install_kill_hook(k: int) -> None:
    from accel.calibrate.gqsa import GQSALayerMethod
    from accel.calibrate.prune import _LayerPruner

    for cls in (_LayerPruner, GQSALayerMethod):
        orig = cls.process_layer

        def process_layer(self, i, layer, data, _orig=orig):
            out = _orig(self, i, layer, data)
            if i == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        cls.process_layer = process_layer


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("method")
    p.add_argument("output")
    p.add_argument("--model-seed", type=int, default=0)
    p.add_argument("--perturb", action="store_true")
    a = p.parse_args(argv)
    # One thread: the parent's reference run uses one too, so the results can be byte-equal.
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    kill = os.environ.get("ACCEL_TEST_KILL_AT_LAYER")
    if kill is not None:
        _install_kill_hook(int(kill))
    run(a.method, a.output, a.model_seed, a.perturb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
