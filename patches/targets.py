"""Which linears a method touches: `targets`/`ignore` lists of names, class names or `re:` regexes.

By default every `nn.Linear` inside the decoder layers is a target; `lm_head` and embeddings are
never included unless named explicitly.
"""
from __future__ import annotations

import re
from typing import Iterator, Sequence

from torch import nn

from accel.errors import AccelError

from . import compat


class TargetError(ValueError, AccelError):
    """A targets/ignore pattern is malformed or matches nothing."""


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern) or type(module).__name__ == pattern


def iter_linears(model, targets: Sequence[str] | None = None, ignore: Sequence[str] = (),
                 include_patched: bool = False) -> Iterator[tuple[str, nn.Module]]:
    """Yield `(qualified_name, linear)` for the selected linears, in model order.

    Only plain `nn.Linear`s, unless `include_patched`: then accel's swapped-in linears too (the
    stacking check needs them, to refuse a second weight method instead of skipping them)."""
    from .linear import AccelLinear

    kinds = (nn.Linear, AccelLinear) if include_patched else nn.Linear
    prefix = compat.SUPPORTED_MODEL_TYPES.get(compat.text_config(model.config).model_type, "model.layers")
    layers = model.get_submodule(prefix)
    found = []
    for lname, mod in layers.named_modules():
        name = f"{prefix}.{lname}" if lname else prefix
        if not isinstance(mod, kinds):
            continue
        if targets and not any(_matches(p, name, mod) for p in targets):
            continue
        if any(_matches(p, name, mod) for p in ignore):
            continue
        found.append((name, mod))
    if targets and not found:
        raise TargetError(f"targets {list(targets)} match no linear in {type(model).__name__}")
    yield from found
