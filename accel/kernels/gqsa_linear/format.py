"""The GQSA weight format: group-sparse, group-quantized (BSR-like) linear weights.

A weight `W: [out, in]` is cut into groups of `g` consecutive input channels per output row
(`n_groups = in // g`). Each row keeps the same number `n_keep` of groups (balanced rows, so a
"fixed groups per row" replaces BSR row pointers). Each kept group is quantized asymmetrically
to `bits` with its own scale and (float) zero point:

    w = (q - zero) * scale,   q in [0, 2**bits - 1]

Storage (all tensors, safetensors-friendly):
    qweight: uint8 [out, nbytes]   codes of the kept groups of each row, in column order; for
                                   bits <= 4 two codes per byte (element e: byte e // 2, low
                                   nibble when e is even), for bits == 8 one per byte
    colmask: uint8 [out, ceil(n_groups / 8)]  the kept groups' column indices as a bitmap (bit j
                                   of byte b: group 8b + j); `cols` decodes it to int16
                                   [out, n_keep]. At g = 16 and 50% it is 1/16 of the bytes of
                                   int16 indices (0.4% of the weight's bf16 bytes, not 3%).
                                   Artifacts of version 1 stored `cols` and still load.
    scales:  fp16  [out, n_keep]
    zeros:   fp16  [out, n_keep]   float zero point, in code units

`tile_rows` > 1 makes consecutive tiles of that many rows share the same kept groups; the CPU path
then compacts each tile into a smaller dense int4 matrix. Sparsity 0 gives dense group-int4.
"""
from __future__ import annotations

import dataclasses
import functools

from dataclasses import dataclass

import torch

from accel.errors import AccelError

SUPPORTED_BITS = (2, 3, 4, 8)


class GQSAFormatError(ValueError, AccelError):
    """A GQSA weight or its parameters are invalid."""


def check_params(in_features: int, group_size: int, bits: int, sparsity: float) -> None:
    if bits not in SUPPORTED_BITS:
        raise GQSAFormatError(f"bits={bits} is not supported; choose one of {SUPPORTED_BITS}")
    if group_size < 1 or in_features % group_size:
        raise GQSAFormatError(f"group_size={group_size} does not divide in_features={in_features}")
    if not (0.0 <= sparsity < 1.0):
        raise GQSAFormatError(f"sparsity={sparsity} must be in [0, 1)")


def n_keep_for(n_groups: int, sparsity: float) -> int:
    """Groups kept per row: at least one, so every row stays defined."""
    return max(1, n_groups - int(round(sparsity * n_groups)))


def group_scores(weight: torch.Tensor, act_norm: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """Wanda-style group score: sum over the group of |W_ij| * ||X_j||.

    weight: [out, in]; act_norm: [in] (L2 norm of each input channel over the calibration tokens),
    None means plain magnitude. Returns [out, in // group_size] fp32.
    """
    s = weight.detach().float().abs()
    if act_norm is not None:
        s = s * act_norm.float().to(s.device)[None, :]
    return s.view(s.size(0), -1, group_size).sum(-1)


def select_groups(scores: torch.Tensor, sparsity: float, tile_rows: int = 1) -> torch.Tensor:
    """Kept groups per row, sorted: int64 [out, n_keep].

    scores: [out, n_groups]. With tile_rows > 1, each tile of rows keeps the groups with the
    highest score summed over the tile (the last tile may be shorter).
    """
    out, n_groups = scores.shape
    k = n_keep_for(n_groups, sparsity)
    if tile_rows <= 1:
        cols = scores.topk(k, dim=1).indices
    else:
        parts = []
        for r0 in range(0, out, tile_rows):
            t = scores[r0:r0 + tile_rows]
            c = t.sum(0).topk(k).indices
            parts.append(c[None].expand(t.size(0), k))
        cols = torch.cat(parts)
    return cols.sort(dim=1).values


def cols_to_mask(cols: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Kept group indices [out, n_keep] -> bitmap uint8 [out, ceil(n_groups / 8)]: bit j of byte b
    is group 8b + j (little-endian bits). At g = 16 it takes 1/16 of int16 indices' bytes."""
    out = cols.size(0)
    bits = torch.zeros(out, (n_groups + 7) // 8 * 8, dtype=torch.bool, device=cols.device)
    bits.scatter_(1, cols.long(), True)
    weights = (1 << torch.arange(8, device=cols.device, dtype=torch.int32))
    return (bits.view(out, -1, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def mask_to_cols(mask: torch.Tensor, n_groups: int, n_keep: int | None = None) -> torch.Tensor:
    """Inverse of cols_to_mask: int16 [out, n_keep], sorted per row. Every row must keep as many
    groups as the first (or `n_keep`), and no bit may lie past n_groups (GQSAFormatError)."""
    out = mask.size(0)
    if mask.device.type == "meta":  # shape-only tensors: nothing to decode or check
        return torch.empty(out, n_keep or 0, dtype=torch.int16, device=mask.device)
    bits = ((mask.to(torch.int32)[:, :, None] >> torch.arange(8, device=mask.device, dtype=torch.int32)) & 1).bool()
    bits = bits.view(out, -1)
    if bits[:, n_groups:].any():
        raise GQSAFormatError("column bitmap marks a group past in_features")
    counts = bits.sum(1)
    k = n_keep if n_keep is not None else (int(counts[0]) if out else 0)
    if out and not bool((counts == k).all()):
        raise GQSAFormatError(f"column bitmap rows keep different numbers of groups (expected {k} per row)")
    # Stable sort puts the kept (True) groups first in ascending column order.
    order = torch.sort((~bits[:, :n_groups]).to(torch.int8), dim=1, stable=True).indices
    return order[:, :k].to(torch.int16).contiguous()


def gather_groups(weight: torch.Tensor, cols: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> the kept groups [out, n_keep, g] (in cols order)."""
    wg = weight.view(weight.size(0), -1, group_size)
    return torch.gather(wg, 1, cols.long()[:, :, None].expand(-1, -1, group_size))


def minmax_params(wg: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max scale and float zero point per group. wg: [..., g] -> ([...], [...])."""
    qmax = 2 ** bits - 1
    mn = wg.amin(-1)
    mx = wg.amax(-1)
    # 2**-20 survives the fp16 storage of scales (1e-8 would round to zero).
    scale = ((mx - mn) / qmax).clamp(min=2.0 ** -20)
    zero = (-mn / scale).clamp(0, qmax)
    return scale, zero


def quantize_codes(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes q = clamp(round(w / s + z), 0, qmax). wg: [..., g]; scale/zero: [...]."""
    qmax = 2 ** bits - 1
    return torch.clamp(torch.round(wg / scale[..., None] + zero[..., None]), 0, qmax)


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [out, n] (ints) -> uint8 [out, ceil(n/2)] for bits <= 4, or [out, n] for bits 8."""
    q = q.to(torch.uint8)
    if bits == 8:
        return q.contiguous()
    if q.size(1) % 2:
        q = torch.cat([q, q.new_zeros(q.size(0), 1)], 1)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 -> int16 codes [out, n]."""
    p = packed.to(torch.int16)
    if bits == 8:
        return p[:, :n]
    q = torch.stack([p & 0xF, p >> 4], dim=-1).view(p.size(0), -1)
    return q[:, :n]


@dataclass
class GQSAWeight:
    """One packed linear weight (see module docstring for the layout)."""

    qweight: torch.Tensor
    colmask: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    in_features: int
    group_size: int
    bits: int
    tile_rows: int = 1

    @property
    def out_features(self) -> int:
        return self.colmask.size(0)

    @functools.cached_property
    def cols(self) -> torch.Tensor:
        """int16 [out, n_keep]: kept group columns, sorted per row (decoded once from colmask)."""
        return mask_to_cols(self.colmask, self.in_features // self.group_size, self.n_keep)

    def to(self, device) -> "GQSAWeight":
        """The same weight with its tensors on `device`."""
        return dataclasses.replace(self, qweight=self.qweight.to(device), colmask=self.colmask.to(device),
                                   scales=self.scales.to(device), zeros=self.zeros.to(device))

    @property
    def n_keep(self) -> int:
        return self.scales.size(1)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n_keep * self.group_size / self.in_features

    def codes(self) -> torch.Tensor:
        """int16 [out, n_keep, g]."""
        q = unpack_codes(self.qweight, self.n_keep * self.group_size, self.bits)
        return q.view(self.out_features, self.n_keep, self.group_size)

    def dequantize_groups(self) -> torch.Tensor:
        """fp32 [out, n_keep, g]: (q - zero) * scale of each kept group."""
        s, z = self.scales.float()[..., None], self.zeros.float()[..., None]
        return (self.codes().float() - z) * s

    def dequantize(self) -> torch.Tensor:
        """The quantized dense weight, fp32 [out, in], pruned groups zero."""
        out = torch.zeros(self.out_features, self.in_features // self.group_size, self.group_size,
                          device=self.qweight.device)
        out.scatter_(1, self.cols.long()[:, :, None].expand(-1, -1, self.group_size), self.dequantize_groups())
        return out.view(self.out_features, self.in_features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.colmask, self.scales, self.zeros))

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        meta = torch.tensor([self.in_features, self.group_size, self.bits, self.tile_rows], dtype=torch.int64)
        return {f"{prefix}.qweight": self.qweight, f"{prefix}.colmask": self.colmask,
                f"{prefix}.scales": self.scales, f"{prefix}.zeros": self.zeros, f"{prefix}.meta": meta}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> "GQSAWeight":
        try:
            in_f, g, bits, tile = (int(v) for v in tensors[f"{prefix}.meta"].tolist())
            check_params(in_f, g, bits, 0.0)
            if f"{prefix}.colmask" in tensors:
                mask = tensors[f"{prefix}.colmask"]
            else:  # version-1 artifacts: int16 column indices
                cols = tensors[f"{prefix}.cols"]
                if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= in_f // g):
                    raise GQSAFormatError("group column index out of range")
                mask = cols_to_mask(cols, in_f // g)
            w = cls(tensors[f"{prefix}.qweight"], mask, tensors[f"{prefix}.scales"],
                    tensors[f"{prefix}.zeros"], in_f, g, bits, tile)
        except GQSAFormatError:
            raise
        except KeyError as e:
            raise GQSAFormatError(f"GQSA tensors for {prefix!r} are incomplete: missing {e}") from None
        except (ValueError, TypeError) as e:
            # e.g. a .meta tensor of the wrong length or rank: bad input, not a bug.
            raise GQSAFormatError(f"GQSA tensors for {prefix!r} are malformed ({prefix}.meta must hold "
                                  f"[in_features, group_size, bits, tile_rows]): {e}") from None
        w.validate()
        return w

    def validate(self) -> None:
        check_params(self.in_features, self.group_size, self.bits, 0.0)
        n_groups = self.in_features // self.group_size
        out, k = self.scales.shape
        if self.colmask.dtype != torch.uint8 or self.colmask.shape != (out, (n_groups + 7) // 8):
            raise GQSAFormatError(f"colmask has shape {tuple(self.colmask.shape)} {self.colmask.dtype}, "
                                  f"expected ({out}, {(n_groups + 7) // 8}) uint8")
        if self.cols.shape != (out, k):  # decoding checks the bitmap: k groups in every row
            raise GQSAFormatError(f"colmask decodes to {tuple(self.cols.shape)}, expected ({out}, {k})")
        n = k * self.group_size
        nbytes = n if self.bits == 8 else (n + 1) // 2
        if self.qweight.shape != (out, nbytes) or self.qweight.dtype != torch.uint8:
            raise GQSAFormatError(f"qweight has shape {tuple(self.qweight.shape)} {self.qweight.dtype}, "
                                  f"expected ({out}, {nbytes}) uint8")
        if self.zeros.shape != (out, k):
            raise GQSAFormatError("zeros do not match scales' shape")
        if not (torch.isfinite(self.scales).all() and torch.isfinite(self.zeros).all()):
            raise GQSAFormatError("scales/zeros contain NaN or inf")


def from_codes(q: torch.Tensor, cols: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               in_features: int, group_size: int, bits: int, tile_rows: int = 1) -> GQSAWeight:
    """Pack codes q: [out, n_keep, g] with their cols/scales/zeros into a GQSAWeight."""
    out = q.size(0)
    cols = cols.long()
    if cols.size(1) > 1 and not bool((cols[:, 1:] > cols[:, :-1]).all()):
        # The stored order is column order (the bitmap holds no other): sort codes and params along.
        cols, order = cols.sort(dim=1)
        q = torch.gather(q, 1, order[:, :, None].expand_as(q))
        scales, zeros = torch.gather(scales, 1, order), torch.gather(zeros, 1, order)
    w = GQSAWeight(pack_codes(q.reshape(out, -1), bits), cols_to_mask(cols, in_features // group_size),
                   scales.to(torch.float16).contiguous(), zeros.to(torch.float16).contiguous(),
                   in_features, group_size, bits, tile_rows)
    w.validate()
    return w


def pack_weight(weight: torch.Tensor, *, sparsity: float = 0.5, group_size: int = 16, bits: int = 4,
                act_norm: torch.Tensor | None = None, tile_rows: int = 1,
                cols: torch.Tensor | None = None) -> GQSAWeight:
    """RTN + group pruning: choose kept groups by Wanda group score (or take `cols`), quantize.

    weight: [out, in]; act_norm: [in] or None.
    """
    out, in_f = weight.shape
    check_params(in_f, group_size, bits, sparsity)
    w = weight.detach().float().cpu()
    if cols is None:
        cols = select_groups(group_scores(w, act_norm, group_size), sparsity, tile_rows)
    wg = gather_groups(w, cols, group_size)
    scale, zero = minmax_params(wg, bits)
    # Round the params to their storage dtype first, so codes are computed against what is stored.
    scale, zero = scale.half().float(), zero.half().float()
    q = quantize_codes(wg, scale, zero, bits)
    return from_codes(q, cols, scale, zero, in_f, group_size, bits, tile_rows)
