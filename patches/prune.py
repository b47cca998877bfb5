"""Runtime of the "prune" method: swap each targeted linear for a `MaskedLinear`.

Masks travel bit-packed in the artifact (1 bit per weight, `pack_mask`). On CPU the masked linear
runs the *dense* kernel on masked weights (kernel "dense-masked"): the result is the pruned
model's, but there is no speedup. On CUDA, 2:4 masks with fp16/bf16 weights can use torch's
semi-structured sparse tensors (kernel "cuda-2:4-semi"), but only when `ACCEL_SEMI_SPARSE=1`:
measured on an H200 (torch 2.11, eval/results/gpu_check_h200_prune*.json) they were correct but
slower than the dense GEMM at every decode size (4096x4096, 1 token: 628 us eager / 34 us in a
CUDA graph, dense 19 / 10 us) and won only at 2048 tokens inside a CUDA graph (94 vs 106 us),
so dense-masked is the default everywhere.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from accel.artifact import ArtifactError
from accel.configs.prune import PruneConfig

from .core import CheckpointFormat, PatchContext, register_checkpoint, register_method
from .linear import AccelLinear
from .targets import iter_linears

log = logging.getLogger(__name__)


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """keep: [out, in] bool -> uint8 [ceil(out*in / 8)] (numpy.packbits, big-endian bit order)."""
    return torch.from_numpy(np.packbits(keep.detach().cpu().numpy().astype(bool).reshape(-1)))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of `pack_mask`; raises ArtifactError if the size does not fit `shape`."""
    n = int(shape[0]) * int(shape[1])
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1 \
            or packed.numel() != (n + 7) // 8:
        raise ArtifactError(f"packed mask of {packed.numel()} {packed.dtype} bytes does not fit a weight of "
                            f"shape {tuple(shape)} ({(n + 7) // 8} bytes expected)")
    bits = np.unpackbits(packed.numpy(), count=n)
    return torch.from_numpy(bits.astype(bool)).view(*shape)


def semi_sparse_enabled() -> bool:
    return os.environ.get("ACCEL_SEMI_SPARSE", "0").strip().lower() in ("1", "true", "yes", "on")


def _semi_structured(weight: torch.Tensor):
    """torch's 2:4 semi-structured sparse weight, or None where unsupported (no CUDA, old GPU/torch)
    or not asked for (ACCEL_SEMI_SPARSE unset: see the module docstring)."""
    if weight.device.type != "cuda" or weight.dtype not in (torch.float16, torch.bfloat16):
        return None
    if not semi_sparse_enabled():
        return None
    try:
        from torch.sparse import to_sparse_semi_structured

        return to_sparse_semi_structured(weight)
    except Exception as e:  # noqa: BLE001 - any failure means "use the dense path"
        log.info("2:4 semi-structured sparse weights unavailable (%s); using dense-masked", e)
        return None


class MaskedLinear(AccelLinear):
    """`y = x @ (W * mask)^T + b` with the mask folded into a copy of the weight.

    x: [..., in] -> [..., out]. The original linear is left untouched, so unpatch restores it.
    """

    method = "prune"

    def __init__(self, linear: nn.Linear, keep: torch.Tensor, pattern: str = "unstructured",
                 packed: torch.Tensor | None = None):
        super().__init__(linear.in_features, linear.out_features)
        if tuple(keep.shape) != tuple(linear.weight.shape):
            raise ArtifactError(f"mask shape {tuple(keep.shape)} does not match weight {tuple(linear.weight.shape)}")
        w = linear.weight.detach() * keep.to(linear.weight.device, linear.weight.dtype)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = linear.bias
        self.pattern = pattern
        self.sparsity = 1.0 - keep.float().mean().item()
        # The bit-packed mask (pack_mask), kept on the CPU for accel.save_pretrained.
        self.packed_mask = pack_mask(keep) if packed is None else packed.detach().cpu()
        self._sparse_w = _semi_structured(w) if pattern == "2:4" else None

    @property
    def kernel_path(self) -> str:
        return "cuda-2:4-semi" if self._sparse_w is not None else "dense-masked"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._sparse_w is not None and x.device.type == "cuda":
            return F.linear(x, self._sparse_w, self.bias)
        return F.linear(x, self.weight, self.bias)


@register_method("prune", claims=("linear",))
def apply_prune(ctx: PatchContext, cfg: PruneConfig, tensors: dict) -> None:
    linears = list(iter_linears(ctx.model, cfg.targets, cfg.ignore))
    missing = [n for n, _ in linears if n not in tensors]
    if missing:
        raise ArtifactError(f"prune artifact has no mask for {len(missing)} targeted linear(s), e.g. {missing[0]}")
    extra = sorted(set(tensors) - {n for n, _ in linears})
    if extra:
        raise ArtifactError(f"prune artifact has masks for linears this model lacks, e.g. {extra[0]}")
    for name, lin in linears:
        try:
            keep = unpack_mask(tensors[name], tuple(lin.weight.shape))
        except ArtifactError as e:
            raise ArtifactError(f"prune artifact, mask of {name}: {e}") from None
        new = MaskedLinear(lin, keep, cfg.pattern, packed=tensors[name])
        ctx.swap_module(name, new, detail=f"{cfg.label} {cfg.pattern} sparsity {new.sparsity:.3f}")


def _export(mod: MaskedLinear) -> dict[str, torch.Tensor]:
    out = {"weight": mod.weight.detach(), "mask": mod.packed_mask}
    if mod.bias is not None:
        out["bias"] = mod.bias.detach()
    return out


# The pruned (masked) weight is stored dense, under `accel_weight` in the checkpoint (see
# accel/hf_checkpoint.py HIDDEN): a loader that does not know accel stops on the empty `weight`.
register_checkpoint("prune", CheckpointFormat(
    kind="linear", export=_export, linear_leaves=("weight", "bias"), dtype_leaves=frozenset({"weight", "bias"}),
    required=frozenset({"weight", "mask"}), to_tensors=lambda name, leaves: {name: leaves["mask"]}))
