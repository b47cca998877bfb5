"""Loading an accel HF checkpoint (accel/hf_checkpoint.py) inside `from_pretrained`.

Before the weights load (the model is on the meta device), every linear a method of the
checkpoint targets becomes a `CheckpointSlot`: a module holding, as meta buffers, exactly the
leaves the checkpoint stores for it, in their stored shapes (read from the safetensors headers,
nothing else) and dtypes (the model's dtype for weight/bias-like leaves). transformers then
loads them like any weight, honouring `dtype=` and `device_map=`; no dense weight is ever made
for a GQSA linear. After loading, each slot gives way to the nn.Linear its applier expects
(its loaded weight and bias, or a meta weight) and the checkpoint's methods are applied by
`accel.patch` from the loaded tensors, with its usual checks (an error names the module).
Only safetensors are read; nothing is unpickled.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .artifact import Artifact, ArtifactError, check_fingerprint
from .errors import AccelError
from .hf_checkpoint import GLOBAL_PREFIX, HIDDEN

log = logging.getLogger(__name__)

_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
           "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
           "F64": torch.float64}


class CheckpointSlot(nn.Module):
    """Stands in for a swapped linear (or embedding) while transformers loads its stored leaves
    (buffers). method None: a dense linear whose weight the checkpoint hides under `accel_weight`."""

    def __init__(self, method: str | None, in_features: int, out_features: int, leaves: dict[str, tuple],
                 embedding: bool = False, padding_idx: int | None = None):
        super().__init__()
        self.method, self.in_features, self.out_features = method, in_features, out_features
        self.embedding, self.padding_idx = embedding, padding_idx
        for leaf, (shape, dtype) in leaves.items():
            self.register_buffer(leaf, torch.empty(shape, dtype=dtype, device="meta"))

    def forward(self, *args, **kwargs):  # pragma: no cover - replaced before any forward
        raise RuntimeError("an accel checkpoint slot was not replaced after loading")


@dataclass
class _Load:
    where: str
    configs: list
    qcfg: object
    dtype: torch.dtype
    slots: list[tuple[str, str]] = field(default_factory=list)      # (module name, method)
    hidden: list[str] = field(default_factory=list)                  # dense linears stored as accel_weight
    globals_: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (method, file)


def _header(files: list[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype, str]]:
    from safetensors import safe_open

    out = {}
    for f in files:
        if not f.endswith(".safetensors"):
            raise ArtifactError(f"accel checkpoint: {f} is not a safetensors file; accel reads only safetensors "
                                f"(nothing is unpickled)")
        with safe_open(f, framework="pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                dt = _DTYPES.get(sl.get_dtype())
                if dt is None:
                    raise ArtifactError(f"accel checkpoint: {f}: tensor {k} has unsupported dtype {sl.get_dtype()}")
                out[k] = (tuple(sl.get_shape()), dt, f)
    return out


def _leaves(header: dict, name: str) -> dict:
    p = name + "."
    return {k[len(p):]: v for k, v in header.items() if k.startswith(p) and "." not in k[len(p):]}


def _unhidden(leaf: str) -> str:
    return "weight" if leaf == HIDDEN else leaf


def _module_or_none(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _untie(model, slots: set[str]) -> None:
    """Drop transformers' tied-weight entries that involve a slot (a GQSA embedding and its tied
    lm_head share packed tensors instead): tying a slot's placeholder would fail or undo that."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if not isinstance(tied, dict):
        return
    for target, source in list(tied.items()):
        if any(k.rpartition(".")[0] in slots for k in (target, source)):
            del tied[target]


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def before_weight_loading(model, qcfg, files: list[str] | None) -> _Load:
    """Put a CheckpointSlot where each swapped linear was; returns what `after_weight_loading` needs."""
    from .patches import compat
    from .patches.core import check_supported, checkpoint_format
    from .patches.targets import iter_linears

    where = str(getattr(model.config, "name_or_path", "") or "(checkpoint)")
    try:
        check_supported(model)
        configs = qcfg.method_configs()
        if not files:
            raise ArtifactError("transformers did not pass the checkpoint files to the accel quantizer")
        if not qcfg.fingerprint:
            # Every format-1 checkpoint records one; without it the model check would be skipped.
            raise ArtifactError(f"its quantization_config has no fingerprint (format_version "
                                f"{qcfg.format_version} requires one; re-export the checkpoint)")
        header = _header(files)
        # A global tensor of a method the config does not list would be ignored (the model would
        # load without that method): refuse it by name.
        listed = {c.method for c in configs}
        for k in header:
            if k.startswith(GLOBAL_PREFIX):
                method = next((m for m in sorted(listed, key=len, reverse=True)
                               if k.startswith(f"{GLOBAL_PREFIX}{m}.")), None)
                if method is None:
                    named = k[len(GLOBAL_PREFIX):].partition(".")[0]
                    raise ArtifactError(f"the checkpoint stores {k!r} for method {named!r}, which is not in its "
                                        f"quantization_config (methods: {', '.join(sorted(listed))}; tensors do "
                                        f"not match the config)")
        dtype = next(model.parameters()).dtype
        load = _Load(where, configs, qcfg, dtype)
        claimed: set[str] = set()
        for cfg in configs:
            fmt = checkpoint_format(cfg.method)
            if fmt is None:
                raise ArtifactError(f"method {cfg.method!r} has no checkpoint format in this accel")
            if fmt.kind == "global":
                p = f"{GLOBAL_PREFIX}{cfg.method}."
                load.globals_.update({k: (cfg.method, v[2]) for k, v in header.items() if k.startswith(p)})
                continue
            if fmt.kind != "linear":
                continue
            # A format may name other modules than the target linears (GQSA: the embedding, lm_head).
            mods = fmt.modules(model, cfg) if hasattr(fmt, "modules") else \
                [(n, lin, fmt.required) for n, lin in iter_linears(model, cfg.targets, cfg.ignore)]
            for name, mod, required in list(mods):
                leaves = _leaves(header, name)
                missing = sorted(required - {_unhidden(k) for k in leaves})
                if missing:
                    raise ArtifactError(f"{name}: the {cfg.method} config targets this module but the checkpoint "
                                        f"has no {', '.join(missing)} for it (tensors do not match the config)")
                specs = {leaf: (shape, dtype if _unhidden(leaf) in fmt.dtype_leaves else dt)
                         for leaf, (shape, dt, _) in leaves.items()}
                emb = isinstance(mod, nn.Embedding)
                dims = (mod.embedding_dim, mod.num_embeddings) if emb else (mod.in_features, mod.out_features)
                _set_child(model, name, CheckpointSlot(cfg.method, *dims, specs, embedding=emb,
                                                       padding_idx=getattr(mod, "padding_idx", None)))
                load.slots.append((name, cfg.method))
                claimed.add(name)
        # Dense linears the checkpoint hides (so that a loader without accel fails on the empty
        # `weight` where they were): Double Sparsity's q/k projections, identity's linears.
        for k in header:
            name = k[:-len(HIDDEN) - 1]
            if k.endswith("." + HIDDEN) and name not in claimed:
                lin = _module_or_none(model, name)
                if not isinstance(lin, nn.Linear):
                    raise ArtifactError(f"{name}: the checkpoint stores {k!r} but this model has no linear there "
                                        f"(tensors do not match the config)")
                specs = {leaf: (shape, dtype) for leaf, (shape, _, _) in _leaves(header, name).items()}
                _set_child(model, name, CheckpointSlot(None, lin.in_features, lin.out_features, specs))
                load.hidden.append(name)
                claimed.add(name)
        _untie(model, claimed)
        # Compressed leaves of a linear no config targets: the tensors do not match the config.
        expected = set(model.state_dict())
        for k in header:
            if k not in expected and not k.startswith(GLOBAL_PREFIX):
                mod = k.rpartition(".")[0]
                raise ArtifactError(f"{mod}: the checkpoint stores {k!r}, which no method of its quantization_config "
                                    f"accounts for (tensors do not match the config)")
        compat.keys_to_ignore_on_load_unexpected(model).add(rf"^{GLOBAL_PREFIX.replace('.', '[.]')}")
    except AccelError as e:
        raise ArtifactError(f"accel checkpoint {where}: {e}") from None
    return load


def _slot_leaves(model, name: str) -> dict[str, torch.Tensor]:
    leaves = dict(model.get_submodule(name).named_buffers(recurse=False))
    if any(t.is_meta for t in leaves.values()):
        raise ArtifactError(f"{name}: its tensors were not loaded (disk offload of accel modules is not "
                            f"supported; choose a device_map without 'disk')")
    return leaves


def after_weight_loading(model, load: _Load) -> None:
    """Swap each slot for its linear, then apply the checkpoint's methods with `accel.patch`."""
    from safetensors import safe_open

    from .patches import core

    tensors: dict[str, torch.Tensor] = {}
    try:
        for name in load.hidden:
            leaves = _slot_leaves(model, name)
            lin = model.get_submodule(name)
            w = leaves[HIDDEN]
            if tuple(w.shape) != (lin.out_features, lin.in_features):
                raise ArtifactError(f"{name}: its stored weight is {tuple(w.shape)}, the model's "
                                    f"{(lin.out_features, lin.in_features)} (tensors do not match the model)")
            dense = nn.Linear(lin.in_features, lin.out_features, bias=False, device="meta", dtype=w.dtype)
            dense.weight = nn.Parameter(w)
            if "bias" in leaves:
                dense.bias = nn.Parameter(leaves["bias"])
            _set_child(model, name, dense)
        for name, method in load.slots:
            slot = model.get_submodule(name)
            leaves = _slot_leaves(model, name)
            if HIDDEN in leaves:
                leaves["weight"] = leaves.pop(HIDDEN)
            fmt = core.checkpoint_format(method)
            if slot.embedding:
                # The applier reads only its shape, dtype and padding_idx: no dense table is made.
                lin = nn.Embedding(slot.out_features, slot.in_features, padding_idx=slot.padding_idx, device="meta",
                                   dtype=load.dtype)
            else:
                lin = nn.Linear(slot.in_features, slot.out_features, bias=False, device="meta", dtype=load.dtype)
            if "weight" in fmt.linear_leaves:
                lin.weight = nn.Parameter(leaves["weight"], requires_grad=False)
            else:
                # Shape and dtype only: as a buffer, so code that takes the model's device from
                # `next(model.parameters())` (Double Sparsity, applied first) never sees meta.
                w = lin.weight
                del lin.weight
                lin.register_buffer("weight", w.data, persistent=False)
            if "bias" in fmt.linear_leaves and "bias" in leaves:
                lin.bias = nn.Parameter(leaves["bias"], requires_grad=False)
            _set_child(model, name, lin)
            tensors.update({f"{method}/{k}": v for k, v in fmt.to_tensors(name, leaves).items()})
        by_file: dict[str, list[str]] = {}
        for k, (_, f) in load.globals_.items():
            by_file.setdefault(f, []).append(k)
        for f, keys in by_file.items():
            with safe_open(f, framework="pt") as fh:
                for k in keys:
                    method = load.globals_[k][0]
                    tensors[f"{method}/{k[len(GLOBAL_PREFIX) + len(method) + 1:]}"] = fh.get_tensor(k)
        art = Artifact(configs=load.configs, tensors=tensors, fingerprint=dict(load.qcfg.fingerprint),
                       path=Path(load.where))
        # Checked after the patch: before it, stand-in linears hold meta weights. The hash reads
        # only embedding rows (a packed embedding's `fingerprint_rows`) and norms, which no method
        # changes, so the patched model gives the base model's fingerprint.
        core.patch(model, art, check_fingerprint=False)
        check_fingerprint(art.fingerprint, model, "checkpoint")
    except AccelError as e:
        raise ArtifactError(f"accel checkpoint {load.where}: {e}") from None
    state = core.state_of(model)
    # The checkpoint's methods are the model's own: unpatch stops here, and the nn.Linears that
    # stood in for the applier are not kept alive by the undo log.
    state.base = state.mark()
    for rec in state.undo:
        if isinstance(rec, core.SetChild):
            rec.old = None
    log.info("loaded accel checkpoint %s: %s", load.where, ", ".join(c.method for c in load.configs))
