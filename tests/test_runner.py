"""The layer-sequential runner reproduces the model's own per-layer computation, and resumes."""
import pytest
import torch
from torch import nn

import accel
from accel.calibrate.runner import CalibrationError, capture_inputs, linear_input_stats, run_layerwise
from accel.patches import compat


@pytest.mark.parametrize("arch", accel.models.TINY_ARCHS)
def test_layerwise_outputs_match_model_hidden_states(arch):
    """Chaining the captured layer inputs through every layer gives the model's hidden states."""
    model = accel.models.tiny(arch)
    x = torch.randint(0, 512, (5, 24), generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        ref = model(input_ids=x, output_hidden_states=True, use_cache=False).hidden_states
    data = capture_inputs(model, x, batch_size=2)
    assert data.chunk_sizes == [2, 2, 1]
    torch.testing.assert_close(torch.cat(data.hidden), ref[0], rtol=0, atol=0)
    layers = compat.decoder_layers(model)
    for i, layer in enumerate(layers[:-1]):
        data.advance(layer, i)
        torch.testing.assert_close(torch.cat(data.hidden), ref[i + 1], rtol=1e-5, atol=1e-5)


class _HalveMethod:
    """Toy method: scales each layer's up_proj by a statistic of its inputs (depends on order)."""

    def __init__(self):
        self.seen = []

    def process_layer(self, i, layer, data):
        norms = {}
        linear_input_stats(layer, data, i, {"up": layer.mlp.up_proj},
                           lambda n, x: norms.__setitem__(n, x.pow(2).sum(0)))
        scale = 1.0 / (1.0 + norms["up"].mean())
        with torch.no_grad():
            layer.mlp.up_proj.weight.mul_(scale)
        self.seen.append(i)
        return {"scale": scale.reshape(1)}

    def restore_layer(self, i, layer, tensors):
        with torch.no_grad():
            layer.mlp.up_proj.weight.mul_(tensors["scale"])


def test_resume_equals_uninterrupted(tmp_path):
    x = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(42))
    full = accel.models.tiny("llama")
    run_layerwise(full, x, _HalveMethod(), batch_size=2, progress=False)

    part = accel.models.tiny("llama")
    m1 = _HalveMethod()
    run_layerwise(part, x, m1, batch_size=2, checkpoint_dir=tmp_path, progress=False, stop_after=2)
    assert m1.seen == [0, 1]
    resumed = accel.models.tiny("llama")  # a fresh process would reload the original model
    m2 = _HalveMethod()
    stats = run_layerwise(resumed, x, m2, batch_size=2, checkpoint_dir=tmp_path, progress=False)
    assert m2.seen == [2, 3] and stats.resumed_layers == 2
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_other_settings_start_fresh_and_say_so(tmp_path, caplog):
    x = torch.randint(0, 512, (2, 8))
    run_layerwise(accel.models.tiny("llama"), x, _HalveMethod(), checkpoint_dir=tmp_path, run_key={"s": 0.5},
                  progress=False, stop_after=1)
    m = _HalveMethod()
    stats = run_layerwise(accel.models.tiny("llama"), x, m, checkpoint_dir=tmp_path, run_key={"s": 0.6},
                          progress=False)
    assert stats.resumed_layers == 0 and m.seen == [0, 1, 2, 3]
    assert "different config; starting fresh" in caplog.text


def test_checkpoint_dir_with_user_files_is_refused_and_kept(tmp_path):
    (tmp_path / "thesis.tex").write_text("mine")
    with pytest.raises(CalibrationError, match="thesis.tex"):
        run_layerwise(accel.models.tiny("llama"), torch.randint(0, 512, (2, 8)), _HalveMethod(),
                      checkpoint_dir=tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]


def test_nan_activations_are_named():
    model = accel.models.tiny("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    x = torch.randint(0, 512, (2, 8))

    class Noop:
        def process_layer(self, i, layer, data):
            return {}

        def restore_layer(self, i, layer, t):
            pass

    with pytest.raises(CalibrationError, match="layer 1"):
        run_layerwise(model, x, Noop(), progress=False)


def test_empty_samples_rejected():
    with pytest.raises(CalibrationError, match="non-empty"):
        capture_inputs(accel.models.tiny("llama"), torch.zeros(0, 8, dtype=torch.long))
