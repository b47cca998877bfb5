"""Which methods may share a module, checked before a method touches the model.

A method's kind is what its applier claims (`@register_method(name, claims=("attention",))`, or
("linear",), or a function of the config): nothing here lists methods, so a new one (a KV press
is an attention method) stacks by its claims alone.

Rules (see `accel.patch`):
- a linear takes at most one weight method (prune, gqsa, rsparse, identity's linears): a second
  one would either silently apply to nothing (appliers only replace plain `nn.Linear`s) or stack
  two weight formats that no kernel computes;
- the attention takes at most one attention method (double-sparsity or another KV press,
  identity's attention);
- one attention method composes with one weight method, in either order;
- the same method from the same artifact (or an equal config) again is refused too: re-patching
  is not idempotent, so that a changed artifact on disk never becomes a silent no-op.

Recipes (`accel.calibrate(model, [cfg1, cfg2, ...])`) follow the same rules, checked by
`check_recipe` on the model before any calibration: at most one attention method, and weight
methods only on disjoint linears (their targets/ignore resolved on the model), so two weight
stages on one linear fail up front instead of after the first stage's calibration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from accel.errors import AccelError

from .targets import TargetError, iter_linears

ATTENTION, LINEAR = "attention", "linear"


class PatchConflictError(ValueError, AccelError):
    """A method would share a module with a method it cannot be stacked with (or with itself)."""


@dataclass
class Claim:
    module: str  # path from the model root
    kind: str  # ATTENTION or LINEAR
    method: str
    source: str  # the artifact path, "in-memory artifact" or "config"
    config: Any = None


def conflict_message(claim: Claim, method: str, source: str, config) -> str:
    what = "linear's weights" if claim.kind == LINEAR else "attention"
    if claim.method == method and claim.source == source and claim.config == config:
        return (f"{claim.module} is already patched by {method} from the same {source}: patching it again is "
                f"refused (re-patching is not idempotent); call accel.unpatch(model) first")
    return (f"cannot stack {method} ({source}) on {claim.method} ({claim.source}) at {claim.module}: both replace "
            f"the {what}. A model takes one attention method (such as double-sparsity) and one weight method "
            f"(such as prune, gqsa or rsparse) per linear; call accel.unpatch(model) first to change methods")


def planned_linears(model, cfg) -> list[str]:
    """The linears a weight method's targets/ignore select, already-patched ones included (and, for
    GQSA embedding_bits, the input embedding and lm_head it packs too)."""
    targets, ignore = getattr(cfg, "targets", None), getattr(cfg, "ignore", ()) or ()
    names = [n for n, _ in iter_linears(model, targets, ignore, include_patched=True)]
    if getattr(cfg, "embedding_bits", None) is not None:
        # GQSA embedding_bits also replaces the input embedding and the lm_head.
        from .gqsa_embedding import embedding_modules

        names += [n for n in embedding_modules(model)[::2] if n is not None and n not in names]
    if not names:
        raise TargetError(f"{cfg.method}: targets={targets} ignore={list(ignore)} select no linear of "
                          f"{type(model).__name__}; nothing would be patched")
    return names


def check_stack(model, claims: list[Claim], cfg, kinds: tuple[str, ...], source: str) -> None:
    """Raise PatchConflictError before `cfg` is applied if it would share a module it may not."""
    if ATTENTION in kinds:
        for c in claims:
            if c.kind == ATTENTION:
                raise PatchConflictError(conflict_message(c, cfg.method, source, cfg))
    if LINEAR in kinds:
        taken = {c.module: c for c in claims if c.kind == LINEAR}
        for name in planned_linears(model, cfg):
            if name in taken:
                raise PatchConflictError(conflict_message(taken[name], cfg.method, source, cfg))


def check_recipe(model, configs, kinds_of) -> None:
    """PatchConflictError naming both stages' methods (and the module) if the recipe `configs`
    could not be patched together on `model`: the rules above, checked before any calibration.
    kinds_of(cfg) -> the method's claims (ATTENTION / LINEAR)."""
    attention: tuple[int, Any] | None = None
    owner: dict[str, tuple[int, Any]] = {}
    for i, cfg in enumerate(configs):
        kinds = tuple(kinds_of(cfg))
        if ATTENTION in kinds:
            if attention is not None:
                j, prev = attention
                raise PatchConflictError(
                    f"recipe stage {i + 1} ({cfg.method}) cannot follow stage {j + 1} ({prev.method}): both replace "
                    f"the attention; a recipe takes one attention method (such as double-sparsity) and one weight method "
                    f"per linear")
            attention = (i, cfg)
        if LINEAR in kinds:
            for name in planned_linears(model, cfg):
                if name in owner:
                    j, prev = owner[name]
                    raise PatchConflictError(
                        f"recipe stage {i + 1} ({cfg.method}) cannot follow stage {j + 1} ({prev.method}) at {name}: "
                        f"both change the linear's weights (a linear takes one weight method); give them disjoint "
                        f"targets/ignore, or drop one")
                owner[name] = (i, cfg)
