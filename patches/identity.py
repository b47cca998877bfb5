"""The identity method: attention goes through accel's registry entry and linears through
`IdentityLinear`, with no change to the math. Patching with it must leave logits bit-identical."""
from __future__ import annotations

from torch import nn

from accel.configs import IdentityConfig

from . import compat
from .core import CheckpointFormat, PatchContext, register_checkpoint, register_method
from .linear import IdentityLinear
from .targets import iter_linears


class _SdpaHandler:
    kernel_path = "dense"

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        return compat.sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _claims(cfg: IdentityConfig) -> tuple[str, ...]:
    return (("attention",) if cfg.attention else ()) + (("linear",) if cfg.linears else ())


@register_method("identity", claims=_claims)
def apply_identity(ctx: PatchContext, cfg: IdentityConfig, tensors: dict) -> None:
    if cfg.attention:
        ctx.use_accel_attention()
        handler = _SdpaHandler()
        for i, layer in enumerate(compat.decoder_layers(ctx.model)):
            attn = layer.self_attn
            ctx.set_attention_handler(f"{compat.SUPPORTED_MODEL_TYPES[compat.text_config(ctx.model.config).model_type]}.{i}.self_attn", attn, handler)
    if cfg.linears:
        for name, lin in list(iter_linears(ctx.model)):
            if isinstance(lin, nn.Linear):
                ctx.swap_module(name, IdentityLinear(lin))


# IdentityLinear shares the dense weights under their own names: the checkpoint is the dense one.
register_checkpoint("identity", CheckpointFormat(kind="none"))
