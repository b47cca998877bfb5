"""GQSA runtime: swaps each targeted linear for a `GQSALinear` over the packed weight.

The GQSALinear dispatches by device (accel.kernels.dispatch): Triton GEMV/GEMM on CUDA; on CPU
the native AVX-512 kernel (int4, g = 16 or a multiple of 32), else torch's int4 kernel (compacted
per row tile where the layout allows); the dequantize+F.linear reference otherwise.
`accel.report` shows the path and the bytes of each layer.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from accel.artifact import ArtifactError
from accel.configs.gqsa import GQSAConfig
from accel.kernels.dispatch import select_path
from accel.kernels.gqsa_linear.format import GQSAFormatError, GQSAWeight
from accel.kernels.gqsa_linear.reference import gqsa_linear_reference

from .core import CheckpointFormat, PatchContext, register_checkpoint, register_method
from .linear import AccelLinear
from .targets import iter_linears


class GQSALinear(AccelLinear):
    """x: [..., in] -> [..., out] with a packed GQSA weight (buffers) and the original bias."""

    method = "gqsa"

    def __init__(self, w: GQSAWeight, bias: torch.Tensor | None, dtype: torch.dtype = torch.bfloat16):
        super().__init__(w.in_features, w.out_features)
        # Activation dtype the CPU kernel is prepared for: the replaced linear's weight dtype at patch
        # time, then the dtype forward actually sees (so kernel_path names the path that runs).
        self.act_dtype = dtype
        self.group_size, self.bits, self.tile_rows = w.group_size, w.bits, w.tile_rows
        self.register_buffer("qweight", w.qweight)
        self.register_buffer("colmask", w.colmask)
        self.register_buffer("scales", w.scales)
        self.register_buffer("zeros", w.zeros)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._cpu = None
        self._packed = None

    def packed(self) -> GQSAWeight:
        """The buffers as a GQSAWeight, kept while they are the same tensors (so the decoded column
        indices that the Triton and reference paths use are built once per device)."""
        w = self._packed
        if w is None or any(a is not b for a, b in zip((w.qweight, w.colmask, w.scales, w.zeros),
                                                       (self.qweight, self.colmask, self.scales, self.zeros))):
            w = self._packed = GQSAWeight(self.qweight, self.colmask, self.scales, self.zeros, self.in_features,
                                          self.group_size, self.bits, self.tile_rows)
        return w

    def _cpu_kernel(self, dtype: torch.dtype | None = None):
        """The CPU kernel for activations of `dtype` (default: the dtype last prepared for). A
        bf16 / non-bf16 change rebuilds it unless it runs the native kernel, which takes both."""
        k = self._cpu
        if dtype is not None and k is not None and k.path != "cpu-avx512" and \
                (dtype == torch.bfloat16) != (k.dtype == torch.bfloat16):
            k = None
        if k is None:
            from accel.kernels.gqsa_linear.cpu import CPUGQSA
            if dtype is not None:
                self.act_dtype = dtype
            # A local: a concurrent forward keeps the kernel it already holds.
            k = self._cpu = CPUGQSA(self.packed(), dtype=self.act_dtype)
        return k

    @property
    def kernel_path(self) -> str:
        path = select_path(self.qweight.device)
        return self._cpu_kernel().path if path == "cpu" else path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = select_path(x.device)
        if path == "cpu":
            return self._cpu_kernel(x.dtype)(x, self.bias)
        if path == "triton":
            from accel.kernels.gqsa_linear.triton_kernel import gqsa_linear_triton
            return gqsa_linear_triton(x, self.packed(), self.bias)
        return gqsa_linear_reference(x, self.packed(), self.bias)

    def weight_bytes(self) -> int:
        """Bytes of the stored format (codes, column indices, scales, zeros, bias)."""
        return self.packed().nbytes() + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, n_keep={self.scales.size(1)}, tile_rows={self.tile_rows}")


@register_method("gqsa", claims=("linear",))
def apply_gqsa(ctx: PatchContext, cfg: GQSAConfig, tensors: dict) -> None:
    from .gqsa_embedding import embedding_modules

    linears = list(iter_linears(ctx.model, cfg.targets, cfg.ignore))
    # embedding_bits: the input embedding and lm_head tensors are applied after the linears.
    emb_names = set(embedding_modules(ctx.model)[::2]) if cfg.embedding_bits is not None else set()
    extra = sorted({k.rpartition(".")[0] for k in tensors} - {n for n, _ in linears} - emb_names)
    if extra:
        raise ArtifactError(f"gqsa artifact has tensors for {len(extra)} linear(s) this model lacks or its targets "
                            f"exclude, e.g. {extra[0]}: it was made for another model or other targets")
    for name, lin in linears:
        try:
            w = GQSAWeight.from_tensors(tensors, name)
        except GQSAFormatError as e:
            raise ArtifactError(f"gqsa artifact, {name}: {e}") from None
        if (w.out_features, w.in_features) != (lin.out_features, lin.in_features):
            raise ArtifactError(f"gqsa artifact: {name} is {w.out_features}x{w.in_features} in the artifact, "
                                f"{lin.out_features}x{lin.in_features} in the model")
        # From an HF checkpoint, `lin` stands in on the meta device (no dense weight is ever made):
        # the module then stays where the checkpoint's tensors were loaded.
        device = w.qweight.device if lin.weight.is_meta else lin.weight.device
        new = GQSALinear(w, lin.bias, dtype=lin.weight.dtype).to(device)
        dense = lin.out_features * lin.in_features * 2
        ctx.swap_module(name, new, detail=f"W{w.bits} S{w.sparsity:.2f} g{w.group_size} tile{w.tile_rows} "
                                          f"{new.weight_bytes()} B ({new.weight_bytes() / dense:.3f}x bf16)")
    if cfg.embedding_bits is not None:
        from .gqsa_embedding import apply_embeddings
        apply_embeddings(ctx, cfg, tensors, GQSALinear)


_GQSA_LEAVES = ("qweight", "colmask", "scales", "zeros", "meta")


def _export(mod) -> dict[str, torch.Tensor]:
    from .gqsa_embedding import GQSAEmbedding, export_embedding

    if isinstance(mod, GQSAEmbedding):
        return export_embedding(mod)
    if getattr(mod, "tied_to", None):
        # A tied lm_head holds the embedding's tensors, stored once, under the embedding.
        return {} if mod.bias is None else {"bias": mod.bias.detach()}
    w = mod.packed()
    out = {k.rpartition(".")[2]: v for k, v in w.to_tensors("m").items()}
    if mod.bias is not None:
        out["bias"] = mod.bias.detach()
    # An empty `weight` where the dense weight was: a loader that does not know accel fails on
    # its shape instead of loading this linear with random weights.
    out["weight"] = torch.zeros(0, dtype=torch.uint8)
    return out


def _to_tensors(name: str, leaves: dict) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": leaves[k] for k in (*_GQSA_LEAVES, "embed_scale", "fingerprint_rows") if k in leaves}


def _modules(model, cfg: GQSAConfig):
    """(name, module, required leaves) of what a GQSA checkpoint stores: the target linears, and
    with embedding_bits the input embedding and the lm_head (nothing for a tied one)."""
    out = [(n, lin, frozenset(_GQSA_LEAVES)) for n, lin in iter_linears(model, cfg.targets, cfg.ignore)]
    if cfg.embedding_bits is not None:
        from .gqsa_embedding import embedding_modules, is_tied
        e_name, emb, h_name, head = embedding_modules(model)
        out.append((e_name, emb, frozenset(_GQSA_LEAVES)))
        if head is not None:
            out.append((h_name, head, frozenset() if is_tied(model, live=False) else frozenset(_GQSA_LEAVES)))
    return out


@dataclasses.dataclass(frozen=True)
class _GQSAFormat(CheckpointFormat):
    """CheckpointFormat + `modules(model, cfg)`: the loader asks it which modules to make slots for
    (the linears, and with embedding_bits the embedding and lm_head)."""

    def modules(self, model, cfg):
        return _modules(model, cfg)


register_checkpoint("gqsa", _GQSAFormat(
    kind="linear", export=_export, linear_leaves=("bias",), dtype_leaves=frozenset({"bias"}),
    required=frozenset(_GQSA_LEAVES), to_tensors=_to_tensors))
