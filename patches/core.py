"""The patch engine: applies method configs to a model, records how to undo each change, and
collects the report rows.

A method registers an applier `fn(ctx: PatchContext, config, tensors) -> None` with
`@register_method("name")`. The applier changes the model only through `ctx` (module swaps,
attention handlers, the attention implementation), so `unpatch` can restore it exactly.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from accel.artifact import Artifact, ArtifactError
from accel.errors import AccelError
from accel.configs import MethodConfig

from . import attention, compat

log = logging.getLogger(__name__)

_APPLIERS: dict[str, Callable[["PatchContext", MethodConfig, dict], None]] = {}


class UnsupportedModelError(ValueError, AccelError):
    """The model's architecture is not one accel supports."""


def register_method(name: str):
    def deco(fn):
        _APPLIERS[name] = fn
        return fn
    return deco


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
    undo: list[Callable[[], None]] = field(default_factory=list)
    rows: list[ReportRow] = field(default_factory=list)
    methods: list[MethodConfig] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)


class PatchContext:
    """What an applier may do to the model; every action is undoable."""

    def __init__(self, model: torch.nn.Module, state: PatchState, method: str):
        self.model, self.state, self.method = model, state, method

    def swap_module(self, name: str, new: torch.nn.Module, detail: str = "", kind: str = "linear") -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        old = getattr(parent, child)
        setattr(parent, child, new)
        self.state.undo.append(lambda: setattr(parent, child, old))
        self.state.rows.append(ReportRow(name, self.method, kind, new, detail))

    def set_attention_handler(self, name: str, module: torch.nn.Module, handler, detail: str = "") -> None:
        self.use_accel_attention()
        had = "_accel_attention" in module.__dict__
        old = module.__dict__.get("_accel_attention")
        module._accel_attention = handler
        self.state.undo.append(
            lambda: setattr(module, "_accel_attention", old) if had else module.__dict__.pop("_accel_attention", None))
        self.state.rows.append(ReportRow(name, self.method, "attention", handler, detail))

    def use_accel_attention(self) -> None:
        current = compat.attn_implementation(self.model)
        if current == attention.ATTN_NAME:
            return
        attention.register()
        compat.set_attn_implementation(self.model, attention.ATTN_NAME)
        self.state.undo.append(lambda: compat.set_attn_implementation(self.model, current))

    def add_row(self, name: str, kind: str, target=None, detail: str = "") -> None:
        self.state.rows.append(ReportRow(name, self.method, kind, target, detail))

    def on_undo(self, fn: Callable[[], None]) -> None:
        self.state.undo.append(fn)


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
        return list(spec.configs), spec.tensors, spec
    if isinstance(spec, MethodConfig):
        return [spec], {}, None
    if isinstance(spec, (list, tuple)) and all(isinstance(c, MethodConfig) for c in spec):
        return list(spec), {}, None
    raise TypeError(f"accel.patch expects an Artifact, an artifact path, a MethodConfig or a list of them, "
                    f"got {type(spec).__name__}")


def patch(model, spec=None, *, check_fingerprint: bool = True):
    """Patch `model` in place with an artifact, artifact path, or config(s); returns the model."""
    check_supported(model)
    configs, tensors, art = _as_configs(spec)
    if art is not None and check_fingerprint:
        art.check_model(model)
    state: PatchState = model.__dict__.get("_accel_state") or PatchState()
    n_undo = len(state.undo)
    try:
        for cfg in configs:
            fn = _APPLIERS.get(cfg.method)
            if fn is None:
                raise ArtifactError(f"method {cfg.method!r} has no runtime in this accel; "
                                    f"available: {', '.join(sorted(_APPLIERS))}")
            prefix = cfg.method + "/"
            fn(PatchContext(model, state, cfg.method), cfg,
               {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            state.methods.append(cfg)
    except BaseException:
        # Leave the model as it was: roll back whatever this call changed.
        while len(state.undo) > n_undo:
            state.undo.pop()()
        raise
    if art is not None and art.path is not None:
        state.artifacts.append(str(art.path))
    model.__dict__["_accel_state"] = state
    log.info("patched %s with %s", type(model).__name__, ", ".join(c.method for c in configs))
    return model


def unpatch(model):
    """Undo every patch on `model`, restoring the original modules and attention; returns it."""
    state: PatchState | None = model.__dict__.pop("_accel_state", None)
    if state is None:
        return model
    while state.undo:
        state.undo.pop()()
    return model


def is_patched(model) -> bool:
    return model.__dict__.get("_accel_state") is not None


@contextlib.contextmanager
def patched(model, spec=None, **kwargs):
    """`with accel.patched(model, artifact): ...` patches for the block's duration."""
    patch(model, spec, **kwargs)
    try:
        yield model
    finally:
        unpatch(model)


def state_of(model) -> PatchState | None:
    return model.__dict__.get("_accel_state")
