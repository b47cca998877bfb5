"""R-Sparse runtime: swaps each targeted `nn.Linear` for an `RSparseLinear`.

Evaluation protocol: every token of every sequence goes through the sparse + low-rank split
(prefill included). The official R-Sparse evaluation (`prefill_ratio = 0.1`) sparsifies only the
last 10% of each sequence, which flatters perplexity; we do not.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from accel.artifact import ArtifactError
from accel.configs import ConfigError
from accel.configs.rsparse import RSparseConfig, check_rank
from accel.kernels.dispatch import forced_path, select_path
from accel.kernels.rsparse_linear import rsparse_linear
from accel.kernels.rsparse_linear import cpp_ext
from accel.kernels.rsparse_linear.cpu import _bf16_native, rsparse_linear_cpu
from accel.kernels.rsparse_linear.reference import channel_thresholds

from .core import CheckpointFormat, PatchContext, register_checkpoint, register_method
from .linear import AccelLinear
from .targets import iter_linears

log = logging.getLogger(__name__)

# Token counts up to this go through the decode kernels (sparse-input GEMV); above, masked dense.
DECODE_MAX_TOKENS = 8


class RSparseLinear(AccelLinear):
    """y = W[:, S]·x_S + up·(down·x_{not S}) + b with S = {i : |x_i|·scale_i > threshold}.

    Shares the original weight and bias; on first use the weight's data becomes a view of Wᵀ in
    the kernels' stacked [Wᵀ; U_rᵀ] (one copy of W, not two). `scale` is ‖W[:, i]‖ (R-Sparse) or ones (TEAL).
    down: [r, in] = Σ_r V_rᵀ, up: [out, r] = U_r (r = 0: pure sparse).
    """

    method = "rsparse"

    def __init__(self, linear: nn.Linear, threshold: float, scale: torch.Tensor,
                 down: torch.Tensor | None = None, up: torch.Tensor | None = None,
                 s: float = 0.0, rho: float = 1.0):
        super().__init__(linear.in_features, linear.out_features)
        self.weight, self.bias = linear.weight, linear.bias
        dev, dt = linear.weight.device, linear.weight.dtype
        self.threshold = float(threshold)
        self.s, self.rho = float(s), float(rho)
        self.register_buffer("scale", scale.to(dev, torch.float32), persistent=False)
        self.register_buffer("thr_vec", channel_thresholds(self.scale, self.threshold), persistent=False)
        r = 0 if down is None else down.shape[0]
        check_rank(r, self.in_features, self.out_features)
        if r:
            if tuple(down.shape) != (r, self.in_features) or tuple(up.shape) != (self.out_features, r):
                raise ArtifactError(f"low-rank factors {tuple(down.shape)}, {tuple(up.shape)} do not fit a "
                                    f"{self.out_features}x{self.in_features} linear")
            self.register_buffer("down", down.to(dev, dt).contiguous(), persistent=False)
            self.register_buffer("up", up.to(dev, dt).contiguous(), persistent=False)
        else:
            self.down = self.up = None
        self.rank = r
        self._stack = self._wt = self._upt = self._down_pk = self._packed = self._pf = self._wkey = None
        self._path = None

    @property
    def kernel_path(self) -> str:
        forced = forced_path()
        if forced is not None:
            return forced
        dev = self.scale.device
        if self._path is None or self._path[0] != dev:
            self._path = (dev, select_path(dev))
        return self._path[1]

    def stacked_t(self) -> torch.Tensor:
        # [ld, out] = [Wᵀ; U_rᵀ; zero rows], ld = in + r rounded up to 32: the decode kernels read W's
        # (and U_r's) columns as contiguous rows; bf16 prefill multiplies [x_S | down x_rest | 0] by
        # all of it in one GEMM (oneDNN's AMX GEMM runs 5-20% faster with K a multiple of 32 than
        # at in + r, measured at SmolLM2's shapes). Built once.
        w = self.weight
        # A new weight tensor (assigned, or moved) rebuilds; the data pointer is not traceable, and a
        # compiled graph holds the weights it was traced with anyway.
        new_w = not torch.compiler.is_compiling() and self._wkey != w.data_ptr()
        if self._wt is None or self._wt.device != w.device or self._wt.dtype != w.dtype or new_w:
            n_in, r = self.in_features, self.rank
            # A normal tensor even when first called under inference_mode: the weight becomes a view
            # of it below, and an inference tensor could not be updated in place outside that mode.
            with torch.inference_mode(False):
                stack = w.new_zeros((-(-(n_in + r) // 32) * 32, self.out_features))
                stack[:n_in] = w.detach().t()
                if r:
                    stack[n_in:n_in + r] = self.up.detach().t().to(w.dtype)
            self._stack, self._wt = stack, stack[:n_in]
            self._upt = stack[n_in:n_in + r] if r else None
            if not torch.compiler.is_compiling():
                # The weight becomes a [out, in] view of Wᵀ in the stack, so the linear holds one copy
                # of W, not two (with oneDNN's prepacked copy for bf16 prefill, three: +186 MB on
                # SmolLM2). Same values; in-place updates of the weight now reach the kernels too.
                w.data = stack[:n_in].t()
            # Derived from the old weights: rebuilt on next use.
            self._down_pk = self._packed = self._pf = None
            self._wkey = w.data_ptr()
        return self._stack

    def down_packed(self) -> torch.Tensor | None:
        """`down` in the AMX tile layout of the bf16 prefill kernel (cpp_ext.pack_down), built once;
        None at rank 0, off bf16, or without the native kernel."""
        if not self.rank or self.down.dtype != torch.bfloat16 or not cpp_ext.bf16_available():
            return None
        if self._down_pk is None or self._down_pk.device != self.down.device:
            self._down_pk = cpp_ext.pack_down(self.down)
        return self._down_pk

    def packed_weight(self):
        """oneDNN's prepacked form of `stacked_t()` for the bf16 prefill GEMM (cpp_ext.pack_weight),
        built on the first prefill (one more copy of the weight); False where it cannot be had."""
        if self._packed is None:
            self._packed = cpp_ext.pack_weight(self.stacked_t())
            if self._packed is None:
                self._packed = False
        return self._packed if self._packed is not False else None

    def _prefill_state(self) -> tuple:
        # (weight's data_ptr, stacked_t, down_packed, packed_weight), built once: a 32-token prefill
        # linear takes ~50 us, and these lookups cost ~15 us of Python each call.
        stack = self.stacked_t()
        self._pf = (self.weight.data_ptr(), stack, self.down_packed(), self.packed_weight())
        return self._pf

    def weight_t(self) -> torch.Tensor:
        """[in, out] contiguous Wᵀ (a view of `stacked_t()`)."""
        self.stacked_t()
        return self._wt

    def up_t(self) -> torch.Tensor | None:
        """[r, out] contiguous U_rᵀ (a view of `stacked_t()`), None at rank 0."""
        self.stacked_t()
        return self._upt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.kernel_path
        tokens = x.numel() // max(x.shape[-1], 1)
        if path == "cpu":
            # Direct call: at SmolLM2 sizes a decode GEMV takes tens of microseconds, so dispatch
            # overhead matters.
            if tokens <= DECODE_MAX_TOKENS:
                wt, upt = self.weight_t(), self.up_t()
            elif (x.dtype == torch.bfloat16 == self.weight.dtype and not torch.compiler.is_compiling()
                  and _bf16_native()):
                # bf16 prefill, eager: the native split + one GEMM over the prepacked stacked_t().
                pf = self._pf
                if pf is None or pf[0] != self.weight.data_ptr():
                    pf = self._prefill_state()
                y = cpp_ext.prefill_bf16(x.reshape(tokens, -1), self.thr_vec, pf[1], self.down, self.bias, pf[2],
                                         packed=pf[3])
                return y.view(*x.shape[:-1], -1)
            else:
                # bf16 prefill: one GEMM over the stacked [Wᵀ; U_rᵀ]; fp32 keeps the masked dense path.
                wt, upt = (self.stacked_t() if x.dtype == torch.bfloat16 else None), None
            return rsparse_linear_cpu(x, self.weight, self.scale, self.threshold, self.down, self.up, self.bias,
                                      weight_t=wt, thr_vec=self.thr_vec, up_t=upt)
        if path == "triton" and tokens > DECODE_MAX_TOKENS:
            path = "reference"
        wt = self.weight_t() if path in ("triton", "cpu") and tokens <= DECODE_MAX_TOKENS else None
        return rsparse_linear(x, self.weight, self.scale, self.threshold, self.down, self.up, self.bias,
                              path=path, weight_t=wt)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", s={self.s:.3f}, rho={self.rho:.3f}, rank={self.rank}"


def channel_scale(linear: nn.Linear, mode: str) -> torch.Tensor:
    """[in]: ‖W[:, i]‖₂ for R-Sparse scoring, ones for TEAL (plain |x_i|)."""
    if mode == "teal":
        return torch.ones(linear.in_features)
    return linear.weight.detach().float().norm(dim=0).cpu()


def build_linear(linear: nn.Linear, tensors: dict, name: str, mode: str) -> RSparseLinear:
    """Build from the artifact tensors `<name>.threshold`, `<name>.s_rho`, optional `.down`/`.up`."""
    if f"{name}.threshold" not in tensors:
        raise ArtifactError(f"rsparse artifact has no threshold for {name}; it was made for another model "
                            f"or other targets")
    thr, s_rho = tensors[f"{name}.threshold"], tensors.get(f"{name}.s_rho")
    if thr.numel() != 1 or bool(torch.isnan(thr.float()).any()) or float(thr) < 0:
        raise ArtifactError(f"rsparse artifact: {name}.threshold must be one value >= 0 (not NaN), got "
                            f"{thr.flatten()[:4].tolist()} (shape {tuple(thr.shape)})")
    if s_rho is None or s_rho.numel() != 2 or not bool(torch.isfinite(s_rho.float()).all()):
        raise ArtifactError(f"rsparse artifact: {name}.s_rho must hold two finite values (s, rho), got "
                            f"{None if s_rho is None else s_rho.flatten()[:4].tolist()}")
    down, up = tensors.get(f"{name}.down"), tensors.get(f"{name}.up")
    if (down is None) != (up is None):
        raise ArtifactError(f"rsparse artifact: {name} has {'down' if up is None else 'up'} but no "
                            f"{'up' if up is None else 'down'} low-rank factor")
    s, rho = (float(v) for v in s_rho)
    try:
        return RSparseLinear(linear, float(thr), channel_scale(linear, mode), down, up, s, rho)
    except (ArtifactError, ConfigError) as e:
        raise ArtifactError(f"rsparse artifact, {name}: {e}") from None


@register_method("rsparse", claims=("linear",))
def apply_rsparse(ctx: PatchContext, cfg: RSparseConfig, tensors: dict) -> None:
    n = 0
    for name, lin in list(iter_linears(ctx.model, cfg.targets, cfg.ignore)):
        if not isinstance(lin, nn.Linear):
            continue
        mod = build_linear(lin, tensors, name, cfg.mode)
        ctx.swap_module(name, mod, detail=f"{cfg.mode} s={mod.s:.2f} rho={mod.rho:.2f} r={mod.rank}")
        n += 1
    if n == 0:
        raise ArtifactError("rsparse: no linear of this model matched the artifact's targets")
    log.info("rsparse: %d linears patched (%s)", n, cfg.mode)


@contextlib.contextmanager
def swapped(root: nn.Module, modules: dict[str, nn.Module]):
    """Temporarily replace submodules of `root` (calibration: one decoder layer) by name."""
    old = {}
    try:
        for name, new in modules.items():
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            old[name] = (parent, child, getattr(parent, child))
            setattr(parent, child, new)
        yield root
    finally:
        for parent, child, mod in old.values():
            setattr(parent, child, mod)


def _export(mod: RSparseLinear) -> dict[str, torch.Tensor]:
    # float64: the threshold and (s, rho) are Python floats; float64 holds them exactly.
    out = {"weight": mod.weight.detach(), "threshold": torch.tensor([mod.threshold], dtype=torch.float64),
           "s_rho": torch.tensor([mod.s, mod.rho], dtype=torch.float64)}
    if mod.bias is not None:
        out["bias"] = mod.bias.detach()
    if mod.rank:
        out["down"], out["up"] = mod.down.detach(), mod.up.detach()
    return out


_RS_LEAVES = ("threshold", "s_rho", "down", "up")

# The dense weight stays (R-Sparse computes with it); the channel scales are recomputed from it.
register_checkpoint("rsparse", CheckpointFormat(
    kind="linear", export=_export, linear_leaves=("weight", "bias"),
    dtype_leaves=frozenset({"weight", "bias", "down", "up"}), required=frozenset({"weight", "threshold", "s_rho"}),
    to_tensors=lambda name, leaves: {f"{name}.{k}": leaves[k] for k in _RS_LEAVES if k in leaves}))
