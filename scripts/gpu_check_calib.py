"""Calibration on the device, for scripts/gpu_check.py (sections `calib` and `calib2`).

The runner keeps activations on the CPU while the model may sit on CUDA; these checks run every
calibration with the model on the device (CI, CPU-only, cannot see a CPU/CUDA mix).
"""
from __future__ import annotations

import torch


def calibration_sections(section, check, _sqnr, DEV) -> dict:
    """gpu_check's `section` decorator, `check` recorder, SQNR helper and device -> {name: fn}."""
    @section("gqsa calibration on the device")
    def gqsa_calibration(quick):
        """Stage 1 (OWL allocation + OBS/GPTQ start) with the model on the device, against the same on CPU."""
        import accel
        from accel.calibrate.gqsa import calibrate_gqsa
        from accel.configs.gqsa import GQSAConfig

        x = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(42))
        ids = x[:2, :16]
        logits, arts = {}, {}
        for dev in ("cpu", DEV):
            model = accel.models.tiny("llama").to(dev)
            cfg = GQSAConfig(bits=4, sparsity=0.5, group_size=16, bqpo_steps=0)
            arts[dev] = calibrate_gqsa(model, None, cfg, samples=x, progress=False, keep_changes=True)
            with torch.no_grad():
                logits[dev] = model(input_ids=ids.to(dev)).logits.float().cpu()
        s = _sqnr(logits["cpu"], logits[DEV])
        ms = arts[DEV].calibration["model_sparsity"]
        check("gqsa obs+owl calibration on device matches cpu", s > 20 and abs(ms - 0.5) < 0.05 and
              bool(torch.isfinite(logits[DEV]).all()), sqnr_db=s, model_sparsity=ms)
        model = accel.models.tiny("llama").to(DEV)
        art = calibrate_gqsa(model, None, GQSAConfig(bits=4, sparsity=0.5, group_size=16, bqpo_steps=2, e2e_steps=2),
                             samples=x, progress=False, keep_changes=True)
        import tempfile

        from accel.artifact import Artifact
        with torch.no_grad():
            ref = model(input_ids=ids.to(DEV)).logits
        with tempfile.TemporaryDirectory() as d:
            art.save(f"{d}/a")
            fresh = accel.models.tiny("llama").to(DEV)
            with accel.patched(fresh, Artifact.load(f"{d}/a")), torch.no_grad():
                out = fresh(input_ids=ids.to(DEV)).logits
        s = _sqnr(ref, out)
        check("gqsa bqpo+e2e on device, saved, patched == calibrated model", bool(torch.isfinite(ref).all()) and s > 30,
              sqnr_db=s, stage2_seconds=art.calibration["stage2_seconds"])


    @section("other calibrations on the device")
    def other_calibrations(quick):
        """Wanda+DSnoT (both runner modes), Double Sparsity and R-Sparse calibration with the model on
        the device: each must run and give finite outputs (the runner keeps activations on the CPU)."""
        import accel
        from accel.calibrate.double_sparsity import calibrate_double_sparsity
        from accel.calibrate.prune import prune_model
        from accel.calibrate.rsparse import calibrate_rsparse
        from accel.configs.double_sparsity import DoubleSparsityConfig
        from accel.configs.prune import PruneConfig
        from accel.configs.rsparse import RSparseConfig

        x = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(42))
        ids = x[:2, :16].to(DEV)
        for mode in ("joined", "two-pass"):
            model = accel.models.tiny("llama").to(DEV)
            prune_model(model, PruneConfig(sparsity=0.5, dsnot=True), x, progress=False, mode=mode)
            with torch.no_grad():
                ok = bool(torch.isfinite(model(input_ids=ids).logits).all())
            w = model.model.layers[0].mlp.up_proj.weight
            check(f"wanda+dsnot {mode} on device", ok and abs((w == 0).float().mean().item() - 0.5) < 0.01)
        model = accel.models.tiny("llama").to(DEV)
        art = calibrate_double_sparsity(model, None, DoubleSparsityConfig(heavy_channels=4), samples=x, progress=False)
        check("double-sparsity calibration on device", len(art.tensors) > 0 and
              all(bool(torch.isfinite(t.float()).all()) for t in art.tensors.values()))
        import accel.data as adata

        model = accel.models.tiny("llama").to(DEV)
        # calibrate_rsparse draws its samples through a tokenizer; the tiny model has none.
        orig, adata.calibration_samples = adata.calibration_samples, lambda tok, spec: x
        try:
            art = calibrate_rsparse(model, None, RSparseConfig(sparsity=0.5), n_samples=4, seq_len=32, progress=False,
                                    greedy_tokens=32, eval_samples=1)
        finally:
            adata.calibration_samples = orig
        check("rsparse calibration on device", len(art.tensors) > 0 and
              all(bool(torch.isfinite(t.float()).all()) for t in art.tensors.values()))

    return {"calib": gqsa_calibration, "calib2": other_calibrations}
