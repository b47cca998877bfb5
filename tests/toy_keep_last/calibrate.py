"""(4) The calibrator of keep-last: nothing to measure, so it records the model's attention shape
(the applier checks an artifact against the model it patches). No calibration data."""
from __future__ import annotations

import torch

from accel.artifact import Artifact
from accel.calibrate import register_calibrator
from accel.patches.kv_press import model_dims


@register_calibrator("keep-last", needs_data=lambda cfg: False)
def calibrate_keep_last(model, config, samples, *, spec, checkpoint_dir=None, progress=True) -> Artifact:
    d = model_dims(model)
    dims = torch.tensor([d["layers"], d["kv_heads"], d["head_dim"]])
    return Artifact.for_model(model, config, tensors={"keep-last/dims": dims}, calibration={"dims": d})
