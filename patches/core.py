"""The patch engine: applies method configs to a model, records how to undo each change, and
collects the report rows.

A method registers an applier `fn(ctx: PatchContext, config, tensors) -> None` with
`@register_method("name", claims=...)` in the runtime module the manifest (accel/methods.py)
names; `accel.patch` imports that module the first time it meets the method. The applier
changes the model only through `ctx` (module swaps, attention handlers, the attention
implementation), so `unpatch` can restore it exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from accel import methods as _methods
from accel.artifact import Artifact, ArtifactError
from accel.errors import AccelError
from accel.configs import ConfigError, MethodConfig

from . import attention, compat
from .stacking import ATTENTION, LINEAR, Claim, PatchConflictError, check_stack, conflict_message
from .targets import TargetError  # noqa: F401  (re-exported: a weight method selecting no linear)
from .undo import _MISSING, AttnImpl, Call, DictEntry, Hook, SetChild, check_copyable, path_of

log = logging.getLogger(__name__)

_APPLIERS: dict[str, Callable[["PatchContext", MethodConfig, dict], None]] = {}
# What each method replaces (stacking.ATTENTION / LINEAR): a tuple, or a function of the config.
_CLAIMS: dict[str, tuple[str, ...] | Callable[[MethodConfig], tuple[str, ...]]] = {}
# How each method's patch is written to / read from an HF checkpoint (accel/hf_checkpoint*.py).
_CHECKPOINTS: dict[str, "CheckpointFormat"] = {}


@dataclass(frozen=True)
class CheckpointFormat:
    """How a method's patch goes into an HF checkpoint (accel.save_pretrained) and back.

    kind "linear": each linear the method swapped is stored under its own path as the leaves
    `export(module) -> {leaf: tensor}` returns; on loading, `linear_leaves` (weight, bias) rebuild
    the nn.Linear the applier receives (a meta weight when "weight" is not among them, so no
    dense weight is ever made), `to_tensors(name, leaves)` gives the applier's artifact tensors,
    `dtype_leaves` load in the model's dtype (the others keep their stored dtype), `required`
    must all be there.
    kind "global": `export(model, state, cfg) -> {name: tensor}`, stored as "accel.<method>.<name>"
    and handed to the applier as its artifact tensors.
    kind "none": the method stores no tensors (the dense weights are the checkpoint's)."""
    kind: str
    export: Callable | None = None
    linear_leaves: tuple[str, ...] = ()
    dtype_leaves: frozenset = frozenset()
    required: frozenset = frozenset()
    to_tensors: Callable | None = None


def register_checkpoint(name: str, fmt: CheckpointFormat) -> CheckpointFormat:
    """Declare that method `name` can be saved as an HF checkpoint (see CheckpointFormat)."""
    if fmt.kind not in ("linear", "global", "none"):
        raise ValueError(f"register_checkpoint({name!r}): kind must be linear, global or none, got {fmt.kind!r}")
    _CHECKPOINTS[name] = fmt
    return fmt


def checkpoint_format(method: str) -> "CheckpointFormat | None":
    """The method's checkpoint format (importing its runtime module), or None: it cannot be saved."""
    get_applier(method)
    return _CHECKPOINTS.get(method)


class UnsupportedModelError(ValueError, AccelError):
    """The model's architecture is not one accel supports."""


def register_method(name: str, claims=()):
    """Register an applier. `claims`: what it replaces, `("linear",)`, `("attention",)`, both, or a
    function of the config returning them; `accel.patch` checks them against the stacking rules."""
    def deco(fn):
        _APPLIERS[name] = fn
        _CLAIMS[name] = claims
        return fn
    return deco


def get_applier(method: str) -> Callable[["PatchContext", MethodConfig, dict], None]:
    """The applier of `method`, importing its runtime module from the manifest on first use;
    ArtifactError when there is none (an artifact names a method this accel cannot run)."""
    fn = _APPLIERS.get(method)
    if fn is None:
        try:
            if _methods.load(method, "runtime"):
                fn = _APPLIERS.get(method)
                if fn is None:
                    raise _methods.not_registered(method, "runtime", "applier (@register_method)")
        except _methods.MethodError as e:
            raise ArtifactError(str(e)) from e
    if fn is None:
        known = sorted(set(_APPLIERS) | {m for m, r in _methods.methods().items() if r.runtime})
        raise ArtifactError(f"method {method!r} has no runtime in this accel; available: {', '.join(known)}")
    return fn


def claims_of(cfg: MethodConfig) -> tuple[str, ...]:
    c = _CLAIMS.get(cfg.method, ())
    return tuple(c(cfg) if callable(c) else c)


@dataclass
class ReportRow:
    module: str
    method: str
    kind: str  # "attention" or "linear" or "cache"
    target: Any = None  # object with a `kernel_path` attribute, read when the report is made
    detail: str = ""

    @property
    def kernel(self) -> str:
        return str(getattr(self.target, "kernel_path", "dense"))


@dataclass
class PatchState:
    """Everything a patch did, as data (undo records resolve module paths against the model they
    are undone on, so a deep copy of a patched model carries a log that restores the copy)."""
    undo: list = field(default_factory=list)
    rows: list[ReportRow] = field(default_factory=list)
    methods: list[MethodConfig] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    # A model loaded from an accel HF checkpoint is patched from birth: the mark after its
    # checkpoint's methods, below which unpatch does not go (there is no dense model to restore).
    base: tuple[int, ...] | None = None

    def mark(self) -> tuple[int, ...]:
        return len(self.undo), len(self.rows), len(self.methods), len(self.artifacts), len(self.claims)

    def rollback(self, model, mark: tuple[int, ...]) -> None:
        """Undo (newest first) and forget everything recorded after `mark`."""
        n_undo, n_rows, n_methods, n_arts, n_claims = mark
        while len(self.undo) > n_undo:
            self.undo.pop().undo(model)
        del self.rows[n_rows:], self.methods[n_methods:], self.artifacts[n_arts:], self.claims[n_claims:]


class PatchContext:
    """What an applier may do to the model; every action is undoable."""

    def __init__(self, model: torch.nn.Module, state: PatchState, method: str, source: str = "config",
                 config: MethodConfig | None = None):
        self.model, self.state, self.method = model, state, method
        self.source, self.config = source, config

    def _claim(self, name: str, kind: str) -> None:
        for c in self.state.claims:
            if c.module == name and c.kind == kind:
                raise PatchConflictError(conflict_message(c, self.method, self.source, self.config))
        self.state.claims.append(Claim(name, kind, self.method, self.source, self.config))

    def swap_module(self, name: str, new: torch.nn.Module, detail: str = "", kind: str = "linear") -> None:
        self._claim(name, LINEAR if kind == "linear" else kind)
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        old = getattr(parent, child)
        setattr(parent, child, new)
        self.state.undo.append(SetChild(parent_name, child, old))
        self.state.rows.append(ReportRow(name, self.method, kind, new, detail))

    def set_attention_handler(self, name: str, module: torch.nn.Module, handler, detail: str = "") -> None:
        path = path_of(self.model, module, name)
        self._claim(path, ATTENTION)
        self.use_accel_attention()
        self.set_dict_entry(module, "_accel_attention", handler, name)
        self.state.rows.append(ReportRow(name, self.method, "attention", handler, detail))

    def set_dict_entry(self, module: torch.nn.Module, key: str, value, hint: str = "") -> None:
        """`module.__dict__[key] = value` (a plain attribute, not a submodule or parameter), undoably."""
        path = path_of(self.model, module, hint)
        self.state.undo.append(DictEntry(path, key, module.__dict__.get(key, _MISSING)))
        module.__dict__[key] = value

    def add_hook(self, module: torch.nn.Module, hook, *, pre: bool, name: str = "") -> None:
        """Register a forward (pre-)hook with kwargs, undoably. The hook should be a function or a
        callable object (deep-copied with the model), not a closure over modules."""
        path = path_of(self.model, module, name)
        reg = module.register_forward_pre_hook if pre else module.register_forward_hook
        handle = reg(hook, with_kwargs=True)
        self.state.undo.append(Hook(path, handle.id))

    def use_accel_attention(self) -> None:
        current = compat.attn_implementation(self.model)
        if current == attention.ATTN_NAME:
            return
        attention.register()
        compat.set_attn_implementation(self.model, attention.ATTN_NAME)
        self.state.undo.append(AttnImpl(current))

    def add_row(self, name: str, kind: str, target=None, detail: str = "") -> None:
        self.state.rows.append(ReportRow(name, self.method, kind, target, detail))

    def on_undo(self, fn: Callable[[], None]) -> None:
        """Call `fn()` on unpatch: a bound method or a closure-free function (see undo.check_copyable)."""
        check_copyable(fn)
        self.state.undo.append(Call(fn))


def check_supported(model) -> None:
    mt = getattr(compat.text_config(getattr(model, "config", None)), "model_type", None) if hasattr(model, "config") else None
    if mt not in compat.SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"accel does not support architecture {mt!r} ({type(model).__name__}); supported model types: "
            f"{', '.join(sorted(compat.SUPPORTED_MODEL_TYPES))}")
    if not compat.can_set_attn_implementation(model):
        raise UnsupportedModelError(f"{type(model).__name__} does not use transformers' AttentionInterface")


def _as_configs(spec) -> tuple[list[MethodConfig], dict, Artifact | None]:
    if spec is None:
        from accel.configs import IdentityConfig
        return [IdentityConfig()], {}, None
    if isinstance(spec, (str, os.PathLike)):
        spec = Artifact.load(Path(spec))
    if isinstance(spec, Artifact):
        if not spec.configs:
            raise ArtifactError(f"artifact {spec.path if spec.path is not None else '(in memory)'} has no methods: "
                                f"nothing to patch")
        return list(spec.configs), spec.tensors, spec
    if isinstance(spec, MethodConfig):
        return [spec], {}, None
    if isinstance(spec, (list, tuple)) and all(isinstance(c, MethodConfig) for c in spec):
        if not spec:
            raise ConfigError("accel.patch got an empty list of method configs: nothing to patch")
        return list(spec), {}, None
    raise TypeError(f"accel.patch expects an Artifact, an artifact path, a MethodConfig or a list of them, "
                    f"got {type(spec).__name__}")


_PLACEMENT = ("offload", "offload_dir")


def _with_placement(configs: list[MethodConfig], from_file: bool, where: str, **chosen) -> list[MethodConfig]:
    """Apply the caller's runtime placement (offload tier and directory) to the configs that have it.

    An artifact read from disk never chooses where accel writes: its offload fields are dropped
    (a shared artifact could otherwise point the KV cache files at any directory)."""
    chosen = {k: v for k, v in chosen.items() if v is not None}
    out, takes = [], False
    for cfg in configs:
        if not all(hasattr(cfg, k) for k in _PLACEMENT):
            out.append(cfg)
            continue
        takes = True
        kw = {}
        if from_file and any(getattr(cfg, k) is not None for k in _PLACEMENT):
            log.info("%s: ignoring %s's offload=%r offload_dir=%r: KV placement is a runtime choice, pass "
                     "accel.patch(model, artifact, offload=..., offload_dir=...)", cfg.method, where,
                     cfg.offload, cfg.offload_dir)
            kw.update(offload=None, offload_dir=None)
        kw.update(chosen)
        out.append(dataclasses.replace(cfg, **kw) if kw else cfg)
    if chosen and not takes:
        raise ConfigError(f"accel.patch: {', '.join(sorted(chosen))} apply to double-sparsity, and the spec has no "
                          f"double-sparsity config (methods: {', '.join(c.method for c in configs)})")
    return out


def patch(model, spec=None, *, check_fingerprint: bool = True, offload: str | None = None,
          offload_dir: str | None = None, offload_select: str | None = None, min_context: int | None = None):
    """Patch `model` in place with an artifact, artifact path, or config(s); returns the model.

    On any error the model is left exactly as it was (everything this call changed is undone).

    Stacking: several calls may stack methods on one model, but a module takes one method of a
    kind: a linear takes at most one weight method (prune, gqsa, rsparse; identity's linears), the
    attention at most one attention method (double-sparsity; identity's attention). So
    Double Sparsity composes with any one weight method, in either order, and anything else
    raises `PatchConflictError` naming both methods and the module. Re-patching with the same
    artifact (or an equal config) is refused with `PatchConflictError` too, not a silent no-op:
    call `accel.unpatch(model)` first. A weight method whose targets/ignore select no linear
    raises `TargetError`; an artifact with no methods raises `ArtifactError`.

    Placement: `offload` ("cpu" | "disk"), `offload_dir` and `offload_select` set the Double
    Sparsity KV offload at patch time. An artifact read from disk (a path, or an `Artifact` with a
    `path`) never chooses placement: its offload fields are ignored (logged). Configs and
    in-memory artifacts built by the caller keep theirs unless these arguments override them.

    `min_context` overrides Double Sparsity's (the context length below which decode stays
    dense; the artifact's value, 8192 by default, otherwise): `min_context=0` makes every decode
    step sparse, as the retrieval and perplexity evaluations do.
    """
    check_supported(model)
    configs, tensors, art = _as_configs(spec)
    from_file = art is not None and art.path is not None
    where = f"artifact {art.path}" if from_file else "the spec"
    configs = _with_placement(configs, from_file, where, offload=offload, offload_dir=offload_dir,
                              offload_select=offload_select, min_context=min_context)
    if art is not None and check_fingerprint:
        art.check_model(model)
    source = f"artifact {art.path}" if from_file else ("in-memory artifact" if art is not None else "config")
    state: PatchState = model.__dict__.get("_accel_state") or PatchState()
    mark = state.mark()
    try:
        for cfg in configs:
            fn = get_applier(cfg.method)
            check_stack(model, state.claims, cfg, claims_of(cfg), source)
            prefix = cfg.method + "/"
            fn(PatchContext(model, state, cfg.method, source, cfg), cfg,
               {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            state.methods.append(cfg)
        for hook in _ON_PATCHED:
            hook(model, state)
    except BaseException:
        # Leave the model as it was: roll back whatever this call changed.
        state.rollback(model, mark)
        raise
    if from_file:
        state.artifacts.append(str(art.path))
    model.__dict__["_accel_state"] = state
    log.info("patched %s with %s", type(model).__name__, ", ".join(c.method for c in configs))
    return model


@dataclass
class ConfigEntry:
    """Undo record: restore `model.config.__dict__[key]` (delete it if it was absent)."""
    key: str
    old: Any = _MISSING

    def undo(self, root) -> None:
        d = root.config.__dict__
        if self.old is _MISSING:
            d.pop(self.key, None)
        else:
            d[self.key] = self.old


# Called at the end of every successful accel.patch, inside its rollback: fn(model, state) records
# its changes in state.undo. patches/hf_quantizer.py adds the one that gives a patched model
# accel's transformers quantizer (so model.save_pretrained writes an accel checkpoint).
_ON_PATCHED: list[Callable[[Any, PatchState], None]] = []


def unpatch(model):
    """Undo every patch on `model`, restoring the original modules and attention; returns it.

    A model that is not patched is returned unchanged (no error). A model loaded from an accel
    checkpoint keeps the checkpoint's methods (there is no dense original to restore): only
    what `accel.patch` added after loading is undone."""
    state: PatchState | None = model.__dict__.get("_accel_state")
    if state is None:
        return model
    if state.base is not None:
        state.rollback(model, state.base)
        log.info("unpatch: %s keeps the methods of the checkpoint it was loaded from", type(model).__name__)
        return model
    state.rollback(model, (0, 0, 0, 0, 0))
    model.__dict__.pop("_accel_state", None)
    return model


def is_patched(model) -> bool:
    return model.__dict__.get("_accel_state") is not None


@contextlib.contextmanager
def patched(model, spec=None, **kwargs):
    """`with accel.patched(model, artifact): ...` patches for the block's duration; on exit it undoes
    this patch only (a model patched before the block stays patched as it was)."""
    before = state_of(model)
    mark = before.mark() if before is not None else None
    patch(model, spec, **kwargs)
    try:
        yield model
    finally:
        after = state_of(model)
        if mark is None:
            unpatch(model)
        elif after is not None:  # (None: the block unpatched the model itself)
            after.rollback(model, mark)


def state_of(model) -> PatchState | None:
    return model.__dict__.get("_accel_state")
