"""GQSA's `embedding_bits` option: the input embedding and the lm_head in the packed GQSA format.

With GQSAConfig(embedding_bits=4 | 8), the token embedding `[vocab, hidden]` is packed as a
dense (sparsity 0) GQSA weight: round to nearest, asymmetric, one fp16 scale and zero per
`embedding_group_size` consecutive channels of a row (llama.cpp's Q4_1 / Q8 blocks are the same
idea). `GQSAEmbedding` gathers the packed rows of the requested tokens and dequantizes only
those; no dense copy is kept. The lm_head becomes a `GQSALinear` of the same format, a dense
int4/int8 GEMV through the GQSA kernels (CPU: the native AVX-512 kernel for int4 with g = 16 or
a multiple of 32; int8 and other group sizes dequantize per call, see docs/methods/gqsa.md).
When the lm_head is tied to the embedding, it holds the embedding's packed tensors (the same
storage, stored once in an HF checkpoint).

Artifact tensors: "gqsa/<embedding module>.{qweight,colmask,scales,zeros,meta}" and, for an
untied lm_head, "gqsa/<lm_head module>.{...}". The calibrator fills them (`pack_embeddings`).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from accel.artifact import ArtifactError
from accel.kernels.gqsa_linear.format import GQSAFormatError, GQSAWeight, pack_weight, unpack_codes

log = logging.getLogger(__name__)

LEAVES = ("qweight", "colmask", "scales", "zeros", "meta")


class GQSAEmbedding(nn.Module):
    """input_ids: [...] int -> [..., hidden] in `dtype`: the packed rows of those tokens,
    (q - zero) * scale per group computed in fp32, then cast (times `embed_scale` when the
    replaced embedding had one, as Gemma's scaled embedding does)."""

    method = "gqsa"

    def __init__(self, w: GQSAWeight, dtype: torch.dtype, padding_idx: int | None = None,
                 embed_scale: torch.Tensor | None = None, fingerprint_rows: torch.Tensor | None = None):
        super().__init__()
        if w.n_keep * w.group_size != w.in_features:
            raise GQSAFormatError("an embedding must be packed dense (sparsity 0)")
        self.num_embeddings, self.embedding_dim = w.out_features, w.in_features
        self.in_features, self.out_features = w.in_features, w.out_features
        self.group_size, self.bits, self.tile_rows = w.group_size, w.bits, w.tile_rows
        self.padding_idx, self.act_dtype = padding_idx, dtype
        self.register_buffer("qweight", w.qweight)
        self.register_buffer("colmask", w.colmask)
        self.register_buffer("scales", w.scales)
        self.register_buffer("zeros", w.zeros)
        # The replaced table's first rows in bf16 (16 x hidden): the model's fingerprint
        # (accel.artifact) hashes them, so artifacts made on the dense model still match it.
        if fingerprint_rows is not None:
            self.register_buffer("fingerprint_rows", fingerprint_rows.detach().to(torch.bfloat16).clone())
        else:
            self.fingerprint_rows = None
        if embed_scale is not None:
            self.register_buffer("embed_scale", embed_scale.detach().float().reshape(()).clone())
        else:
            self.embed_scale = None

    def packed(self) -> GQSAWeight:
        return GQSAWeight(self.qweight, self.colmask, self.scales, self.zeros, self.in_features, self.group_size,
                          self.bits, self.tile_rows)

    kernel_path = "gather-dequant"

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1)
        n_groups = self.in_features // self.group_size
        q = unpack_codes(self.qweight.index_select(0, ids), self.in_features, self.bits)
        s = self.scales.index_select(0, ids).float()[:, :, None]
        z = self.zeros.index_select(0, ids).float()[:, :, None]
        rows = ((q.view(-1, n_groups, self.group_size).float() - z) * s).view(-1, self.in_features)
        rows = rows.to(self.act_dtype)
        if self.embed_scale is not None:
            rows = rows * self.embed_scale.to(self.act_dtype)
        return rows.view(*input_ids.shape, self.in_features)

    def weight_bytes(self) -> int:
        return self.packed().nbytes()

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}, "
                f"dtype={self.act_dtype}")


def embedding_modules(model) -> tuple[str, nn.Module, str | None, nn.Module | None]:
    """(input embedding name, module, lm_head name or None, module or None) of `model`."""
    from .undo import path_of

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    return path_of(model, emb), emb, (None if head is None else path_of(model, head)), head


def is_tied(model, live: bool = True) -> bool:
    """Whether the lm_head reads the input embedding's weight: checked on the live tensors, or
    (live=False, or on the meta device) from the config, as while a checkpoint loads."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None:
        return False
    w = getattr(emb, "weight", None)
    if live and isinstance(w, torch.Tensor) and not w.is_meta:
        return head.weight is w
    from . import compat
    return bool(getattr(compat.text_config(model.config), "tie_word_embeddings", False)
                or getattr(model.config, "tie_word_embeddings", False))


def pack_embeddings(model, cfg) -> dict[str, torch.Tensor]:
    """Artifact tensors ("gqsa/<name>.<leaf>") of the embedding (and an untied lm_head) for
    `cfg.embedding_bits` / `cfg.embedding_group_size`: round to nearest per group (min/max)."""
    if cfg.embedding_bits is None:
        return {}
    e_name, emb, h_name, head = embedding_modules(model)
    out = {}
    mods = [(e_name, emb)] + ([] if head is None or is_tied(model) else [(h_name, head)])
    for name, mod in mods:
        w = mod.weight
        if w.size(1) % cfg.embedding_group_size:
            raise ArtifactError(f"gqsa: embedding_group_size={cfg.embedding_group_size} does not divide the "
                                f"hidden size {w.size(1)} of {name}")
        p = pack_weight(w, sparsity=0.0, group_size=cfg.embedding_group_size, bits=cfg.embedding_bits)
        out.update({f"gqsa/{k}": v for k, v in p.to_tensors(name).items()})
    return out


def _weight(tensors: dict, name: str, shape: tuple[int, int], cfg) -> GQSAWeight:
    try:
        w = GQSAWeight.from_tensors(tensors, name)
    except GQSAFormatError as e:
        raise ArtifactError(f"gqsa artifact, {name}: {e}") from None
    if (w.out_features, w.in_features) != tuple(shape):
        raise ArtifactError(f"gqsa artifact: {name} is {w.out_features}x{w.in_features} in the artifact, "
                            f"{shape[0]}x{shape[1]} in the model")
    if w.n_keep * w.group_size != w.in_features or w.bits != cfg.embedding_bits:
        raise ArtifactError(f"gqsa artifact: {name} is not a dense {cfg.embedding_bits}-bit packed weight "
                            f"(bits {w.bits}, {w.n_keep * w.group_size}/{w.in_features} channels kept)")
    return w


def apply_embeddings(ctx, cfg, tensors: dict, linear_cls) -> set[str]:
    """Swap the input embedding for a GQSAEmbedding and the lm_head for a `linear_cls` (the
    runtime's GQSALinear, passed in so this module does not import patches/gqsa.py back), sharing
    the embedding's tensors when tied. Returns the module names whose tensors it used."""
    GQSALinear = linear_cls

    model = ctx.model
    e_name, emb, h_name, head = embedding_modules(model)
    have = {k.rpartition(".")[0] for k in tensors}
    if cfg.embedding_bits is None:
        return set()
    if e_name not in have:
        raise ArtifactError(f"gqsa artifact: embedding_bits={cfg.embedding_bits} but it has no packed tensors for "
                            f"the input embedding {e_name} (re-run calibration with this accel)")
    ref = emb.weight
    w = _weight(tensors, e_name, (emb.num_embeddings, emb.embedding_dim), cfg)
    device = w.qweight.device if ref.is_meta else ref.device
    scale = getattr(emb, "embed_scale", None)
    if f"{e_name}.embed_scale" in tensors:  # from an HF checkpoint (the live module's is on meta there)
        scale = tensors[f"{e_name}.embed_scale"]
    if isinstance(scale, (int, float)):
        scale = torch.tensor(float(scale))
    rows = tensors.get(f"{e_name}.fingerprint_rows")
    if rows is None:
        rows = ref[:16] if not ref.is_meta else None
    new = GQSAEmbedding(w, ref.dtype, getattr(emb, "padding_idx", None), scale, rows).to(device)
    dense = emb.num_embeddings * emb.embedding_dim * 2
    ctx.swap_module(e_name, new, detail=f"embedding W{w.bits} g{w.group_size} {new.weight_bytes()} B "
                                        f"({new.weight_bytes() / dense:.3f}x bf16)")
    used = {e_name}
    if head is None:
        return used
    if h_name in have:
        hw = _weight(tensors, h_name, (head.out_features, head.in_features), cfg)
        tied = False
    elif is_tied(model):
        # The same tensors as the embedding's (moved with it): one copy in memory and on disk.
        hw, tied = new.packed(), True
    else:
        raise ArtifactError(f"gqsa artifact: embedding_bits={cfg.embedding_bits} but it has no packed tensors for "
                            f"the untied lm_head {h_name}")
    from accel.kernels.gqsa_linear import cpp_ext
    if not cpp_ext.supports(hw.group_size, hw.bits):
        # Measured (49152 x 576, batch 1, loaded 2-core VM): 1.4 s per call int8, 1.7 s int4 g24,
        # against 56 ms for int4 g32 on the native kernel and 47 ms dense bf16.
        log.warning("gqsa: the lm_head at %d bits, group %d has no fast CPU kernel (it dequantizes the whole "
                    "head per call); embedding_bits=4 with a group size of 16 or a multiple of 32 runs the "
                    "native one", hw.bits, hw.group_size)
    hdev = hw.qweight.device if head.weight.is_meta else head.weight.device
    lin = GQSALinear(hw, head.bias, dtype=head.weight.dtype).to(hdev)
    lin.tied_to = e_name if tied else None
    ctx.swap_module(h_name, lin, detail=f"lm_head W{hw.bits} S0 g{hw.group_size}" + (f" tied to {e_name}" if tied
                    else f" {lin.weight_bytes()} B"))
    return used | ({h_name} if not tied else set())


def export_embedding(mod: GQSAEmbedding) -> dict[str, torch.Tensor]:
    out = {k.rpartition(".")[2]: v for k, v in mod.packed().to_tensors("m").items()}
    for k in ("embed_scale", "fingerprint_rows"):
        if getattr(mod, k) is not None:
            out[k] = getattr(mod, k)
    # An empty `weight` where the dense embedding was: a loader without accel fails on its shape.
    out["weight"] = torch.zeros(0, dtype=torch.uint8)
    return out
