"""Double Sparsity channel calibration.

For every layer, three per-channel statistics are accumulated over ALL calibration blocks
(the official script keeps only the last block of its qk statistic):

    q:  mean |q|          per query head   [H, D]
    k:  mean |k|          per KV head      [KVH, D]
    qk: mean |q (.) k|    per query head   [H, D]   (same token, k of the head's KV group)

They are measured where the runtime uses them: on the post-RoPE q and k that reach the
attention function (post q/k-norm on Qwen3), captured by an attention handler, never by a copied
modeling forward. (The paper's q and k statistics are pre-RoPE; RoPE mixes channel pairs
(c, c + D/2), and the label cache stores post-RoPE keys.)

GQA: the label cache is per KV head, so the query heads sharing a KV head are combined (their
statistics summed) into one channel ranking per KV head. The artifact stores the full scores
of every statistic and, per statistic, the full channel order per KV head.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .registry import register_calibrator

log = logging.getLogger(__name__)

STAT_KINDS = ("q", "k", "qk")
SGLANG_JSON = "sglang_ds_channels.json"


# ---- pure statistics ----------------------------------------------------------------------
def block_stats(q: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel sums of one block. q: [B, H, T, D], k: [B, KVH, T, D] (post-RoPE, same tokens)
    -> {"q": [H, D], "k": [KVH, D], "qk": [H, D]} sums over B*T tokens (fp64), plus "n"."""
    B, H, T, D = q.shape
    KVH = k.shape[1]
    qf, kf = q.double(), k.double()
    krep = kf.repeat_interleave(H // KVH, dim=1)
    return {"q": qf.abs().sum((0, 2)), "k": kf.abs().sum((0, 2)), "qk": (qf * krep).abs().sum((0, 2)),
            "n": torch.tensor(float(B * T), dtype=torch.float64)}


def add_stats(acc: dict | None, new: dict) -> dict:
    return {k: v.clone() for k, v in new.items()} if acc is None else {k: acc[k] + new[k] for k in acc}


def mean_stats(acc: dict) -> dict[str, torch.Tensor]:
    return {k: (acc[k] / acc["n"]).float() for k in STAT_KINDS}


def kv_head_scores(scores: torch.Tensor, n_kv: int) -> torch.Tensor:
    """[H or KVH, D] -> [KVH, D]: sums the query heads of each GQA group."""
    h, d = scores.shape
    if h % n_kv:
        raise ValueError(f"{h} heads do not divide into {n_kv} KV heads")
    return scores.view(n_kv, h // n_kv, d).sum(1)


def channel_order(scores: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D] int64: channels by descending score (ties broken by lower index)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


# ---- model walk ---------------------------------------------------------------------------
class _Capture:
    """Attention handler that records q/k statistics and then runs the model's dense SDPA."""

    kernel_path = "dense"

    def __init__(self):
        self.acc = None

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        from accel.patches import compat

        T = query.shape[2]
        # Without a cache the keys are exactly this forward's tokens (same-token q.k).
        self.acc = add_stats(self.acc, block_stats(query, key[:, :, -T:]))
        return compat.sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@torch.inference_mode()
def collect_stats(model, samples: torch.Tensor, batch_size: int = 4, progress: bool = True) -> list[dict]:
    """samples: [N, L] token ids -> per layer {"q": [H, D], "k": [KVH, D], "qk": [H, D]} means."""
    from accel.patches import compat
    from accel.patches.core import PatchContext, PatchState

    from .runner import CalibrationError, check_model, check_samples

    check_model(model)
    check_samples(model, samples)
    state = PatchState()
    ctx = PatchContext(model, state, "double-sparsity-calibration")
    caps = []
    for i, layer in enumerate(compat.decoder_layers(model)):
        cap = _Capture()
        ctx.set_attention_handler(f"layers.{i}", layer.self_attn, cap)
        caps.append(cap)
    device = next(model.parameters()).device
    try:
        for a in tqdm(range(0, samples.shape[0], batch_size), desc="ds calibration", unit="batch",
                      disable=not progress):
            model(input_ids=samples[a:a + batch_size].to(device), use_cache=False)
    finally:
        state.rollback(model, (0, 0, 0, 0, 0))
    if any(c.acc is None for c in caps):
        raise CalibrationError("some attention layers never ran during calibration")
    stats = [mean_stats(c.acc) for c in caps]
    for i, s in enumerate(stats):
        if not all(torch.isfinite(v).all() for v in s.values()):
            raise CalibrationError(f"non-finite calibration statistics (mean |q|, |k|, |q*k|) in decoder layer {i}")
    return stats


def artifact_tensors(stats: list[dict], n_kv: int) -> dict[str, torch.Tensor]:
    """The artifact's tensors: full scores `scores_{q,k,qk}` ([L, H|KVH, D]) and the per-KV-head
    channel order of each statistic `order_{q,k,qk}` ([L, KVH, D] int64)."""
    out = {}
    for kind in STAT_KINDS:
        full = torch.stack([s[kind] for s in stats])
        out[f"scores_{kind}"] = full
        out[f"order_{kind}"] = channel_order(torch.stack([kv_head_scores(s[kind], n_kv) for s in stats]))
    return out


def calibrate_double_sparsity(model, tokenizer, config=None, n_samples: int | None = None,
                              seq_len: int | None = None, seed: int | None = None, source: str | None = None,
                              batch_size: int = 4, progress: bool = True, samples: torch.Tensor | None = None):
    """Calibrate channels for `model`; returns an `accel.Artifact` (not yet saved).

    Kept for existing callers; `accel.calibrate(model, config, ...)` is the entry. Unset
    calibration settings come from the one set of defaults (registry.default_spec)."""
    from accel.configs.double_sparsity import DoubleSparsityConfig
    from accel.data import CalibrationSpec, calibration_samples

    from .registry import default_spec
    from .runner import check_model, check_seq_len

    cfg = config or DoubleSparsityConfig()
    check_model(model)  # before model_dims, which assumes a supported architecture
    _check_channels(model, cfg)
    spec = default_spec(cfg.method, n_samples=n_samples, seq_len=seq_len, seed=seed, source=source)
    if samples is None:
        check_seq_len(model, spec.seq_len)
        samples = calibration_samples(tokenizer, spec)
    elif isinstance(samples, torch.Tensor) and samples.dim() == 2:
        spec = CalibrationSpec(source="given", n_samples=samples.size(0), seq_len=samples.size(1), seed=spec.seed)
    return calibrate_ds(model, cfg, samples, spec=spec, checkpoint_dir=None, progress=progress,
                        batch_size=batch_size)


def _check_channels(model, cfg) -> dict:
    from accel.patches.double_sparsity import model_dims

    dims = model_dims(model)
    cfg.channels_for(dims["head_dim"])
    return dims


@register_calibrator("double-sparsity", check=lambda model, cfg: _check_channels(model, cfg) and None)
def calibrate_ds(model, config, samples: torch.Tensor, *, spec, checkpoint_dir=None, progress: bool = True,
                 batch_size: int = 4):
    """The registered calibrator (registry.py's calling shape). One forward pass over the
    samples, nothing changed in the model; there is no per-layer state worth resuming, so
    `checkpoint_dir` is not written (the cost is one plain forward over the calibration set)."""
    from accel.artifact import Artifact

    from .runner import check_model

    import dataclasses

    check_model(model)
    dims = _check_channels(model, config)
    # The artifact stores r itself, not "the default": its meaning cannot move with accel's defaults.
    config = dataclasses.replace(config, heavy_channels=config.channels_for(dims["head_dim"]))
    stats = collect_stats(model, samples, batch_size=batch_size, progress=progress)
    tensors = {f"{config.method}/{k}": v for k, v in artifact_tensors(stats, dims["kv_heads"]).items()}
    calib = {**spec.to_dict(), "tokens": int(samples.numel()), "statistics": "post-RoPE mean |q|, |k|, |q*k|"}
    return Artifact.for_model(model, [config], tensors=tensors, calibration=calib)


# ---- SGLang export ------------------------------------------------------------------------
def sglang_channel_config(tensors: dict[str, torch.Tensor]) -> dict[str, list[list[int]]]:
    """SGLang's `--ds-channel-config-path` JSON: "model.layers.{i}.self_attn.{q|k|qk}_proj" -> one
    full channel order (HF rotate_half order) per head (query heads for q/qk, KV heads for k).
    `tensors` are the method's tensors (prefix stripped)."""
    out = {}
    n_layers = tensors["scores_qk"].shape[0]
    for i in range(n_layers):
        for kind in STAT_KINDS:
            order = channel_order(tensors[f"scores_{kind}"][i])
            out[f"model.layers.{i}.self_attn.{kind}_proj"] = [[int(c) for c in row] for row in order]
    return out


def write_sglang_json(tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    import os
    import tempfile

    path = Path(path)
    doc = sglang_channel_config(tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    from accel.artifact import output_umask

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    # mkstemp makes the file 0600; a plain open() would have followed the umask.
    os.chmod(tmp, 0o666 & ~output_umask(path.parent))
    os.replace(tmp, path)
    return path


def export_sglang(artifact_dir: str, output: str) -> str:
    """`accel export --format sglang-ds ARTIFACT --output FILE`."""
    from accel.artifact import Artifact, ArtifactError

    art = Artifact.load(artifact_dir)
    t = art.tensors_for("double-sparsity")
    if not all(f"scores_{k}" in t for k in STAT_KINDS):
        raise ArtifactError(f"{artifact_dir} holds no double-sparsity channel scores")
    return str(write_sglang_json(t, output))
