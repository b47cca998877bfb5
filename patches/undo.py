"""The undo log of a patched model: data records resolved against the model root at undo time.

Each record names the module it changed by its path from the root (`""` = the root itself) and
holds the old value, never a closure over the module objects. So `copy.deepcopy(model)` copies a
log that restores the *copy* (the old values are deep-copied in the same pass, sharing parameters
with the copy exactly as they shared them with the original), and `unpatch(copy)` leaves the
original alone.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from . import compat

class _Missing:
    """"No old value" marker; survives copy.deepcopy as itself (a plain object() would not)."""

    def __repr__(self) -> str:
        return "<missing>"

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return "_MISSING"


_MISSING = _Missing()


def resolve(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def path_of(root: nn.Module, module: nn.Module, hint: str = "") -> str:
    """The path of `module` under `root` (checks `hint` first; raises ValueError if not found)."""
    if module is root:
        return ""
    if hint:
        try:
            if root.get_submodule(hint) is module:
                return hint
        except AttributeError:
            pass
    for name, m in root.named_modules(remove_duplicate=False):
        if m is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(root).__name__}")


@dataclass
class SetChild:
    """Put `old` back as child `attr` of the module at `path` (a module swap)."""
    path: str
    attr: str
    old: nn.Module

    def undo(self, root: nn.Module) -> None:
        setattr(resolve(root, self.path), self.attr, self.old)


@dataclass
class DictEntry:
    """Restore `module.__dict__[key]` of the module at `path` (delete it if it was absent)."""
    path: str
    key: str
    old: Any = _MISSING

    def undo(self, root: nn.Module) -> None:
        d = resolve(root, self.path).__dict__
        if self.old is _MISSING:
            d.pop(self.key, None)
        else:
            d[self.key] = self.old


@dataclass
class AttnImpl:
    """Restore the root model's attention implementation."""
    old: str

    def undo(self, root: nn.Module) -> None:
        compat.set_attn_implementation(root, self.old)


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


@dataclass
class Hook:
    """Remove forward (pre-)hook `hook_id` from the module at `path`."""
    path: str
    hook_id: int

    def undo(self, root: nn.Module) -> None:
        m = resolve(root, self.path)
        for name in _HOOK_DICTS:
            d = getattr(m, name, None)
            if d is not None:
                d.pop(self.hook_id, None)


@dataclass
class Call:
    """Call `fn()`: a bound method (deep-copied with its object) or a closure-free function."""
    fn: Callable[[], None]

    def undo(self, root: nn.Module) -> None:
        self.fn()


def check_copyable(fn) -> None:
    """Refuse closures: `copy.deepcopy` keeps a function as it is, so a closure in the log of a
    copied model would act on the original's objects."""
    if isinstance(fn, types.FunctionType) and fn.__closure__:
        raise TypeError(f"undo callback {fn.__qualname__} is a closure; pass a bound method or use a "
                        f"PatchContext action, so that a deep-copied model undoes its own modules")
