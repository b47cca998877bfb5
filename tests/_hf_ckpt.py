"""Artifacts for the HF checkpoint tests: one per method, seeded, no calibration data (fast)."""
import torch

from accel.artifact import Artifact
from accel.configs import IdentityConfig
from accel.configs.double_sparsity import DoubleSparsityConfig
from accel.configs.gqsa import GQSAConfig
from accel.configs.prune import PruneConfig
from accel.configs.rsparse import RSparseConfig
from accel.patches import compat
from accel.patches.prune import pack_mask
from accel.patches.targets import iter_linears


def prune_art(model):
    g = torch.Generator().manual_seed(0)
    tensors = {f"prune/{n}": pack_mask(torch.rand(lin.weight.shape, generator=g) > 0.5)
               for n, lin in iter_linears(model)}
    return Artifact.for_model(model, [PruneConfig(init="wanda", sparsity=0.5)], tensors)


def gqsa_art(model, **kw):
    from accel.calibrate.gqsa import rtn_artifact
    return rtn_artifact(model, GQSAConfig(**{"bits": 4, "sparsity": 0.5, "group_size": 16, "allocation": "uniform",
                                             **kw}))


def rsparse_art(model):
    tensors = {}
    g = torch.Generator().manual_seed(1)
    for i, (n, lin) in enumerate(iter_linears(model)):
        tensors[f"rsparse/{n}.threshold"] = torch.tensor(0.05 + 0.01 * i, dtype=torch.float32)
        tensors[f"rsparse/{n}.s_rho"] = torch.tensor([0.5, 0.9])
        if i % 3 == 0:  # some linears with low-rank factors
            tensors[f"rsparse/{n}.down"] = torch.randn(2, lin.in_features, generator=g) * 0.1
            tensors[f"rsparse/{n}.up"] = torch.randn(lin.out_features, 2, generator=g) * 0.1
    return Artifact.for_model(model, [RSparseConfig()], tensors)


def ds_art(model):
    tc = compat.text_config(model.config)
    g = torch.Generator().manual_seed(0)
    order = torch.stack([torch.stack([torch.randperm(tc.head_dim, generator=g) for _ in range(tc.num_key_value_heads)])
                         for _ in range(tc.num_hidden_layers)])
    cfg = DoubleSparsityConfig(budget=8, sink=2, recent=4, n_dense=1, min_context=16, heavy_channels=4)
    return Artifact.for_model(model, [cfg], {"double-sparsity/order_qk": order})


def identity_art(model):
    return Artifact.for_model(model, [IdentityConfig()], {})


def merged(*arts):
    """One artifact of several methods (what a recipe produces): configs in order, tensors keyed
    "<method>/<name>"."""
    tensors = {}
    for a in arts:
        tensors.update(a.tensors)
    return Artifact(configs=[c for a in arts for c in a.configs], tensors=tensors, fingerprint=arts[0].fingerprint,
                    calibration={"model": "merged"})


def gqsa_embedding_art(model):
    """GQSA with the input embedding and lm_head packed (embedding_bits=4, g32)."""
    return gqsa_art(model, embedding_bits=4, embedding_group_size=32)


BUILDERS = {"prune": prune_art, "gqsa": gqsa_art, "rsparse": rsparse_art, "double-sparsity": ds_art,
            "identity": identity_art}
# Variants of a method (keyed "<method>-<variant>"; the checkpoint names the method).
VARIANTS = {"gqsa-embedding": gqsa_embedding_art}


def build(model, case: str):
    """The artifact of `case`: a BUILDERS / VARIANTS key, or several joined by "+" (merged)."""
    arts = [{**BUILDERS, **VARIANTS}[m](model) for m in case.split("+")]
    return arts[0] if len(arts) == 1 else merged(*arts)
