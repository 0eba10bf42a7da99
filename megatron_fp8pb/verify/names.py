"""Which checkpoint tensors are linears that FORMAT.md quantizes, and which never are: the leaf-name tables."""
from __future__ import annotations

from .. import archs

EXPERT_LEAVES = archs.expert_only_leaves()      # Mixtral-style w1 / w2 / w3, linears only inside experts
LINEAR_LEAVES = tuple(x for x in archs.linear_leaves() if x not in EXPERT_LEAVES)


def module_of(name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj``."""
    return name[:-len(".weight")] if name.endswith(".weight") else name


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """A 2-D ``.weight`` of a linear that FORMAT.md quantizes unless listed: q/k/v/o, gate/up/down (dense, shared and
    experts), MLA's projections, Mixtral-style ``experts.{e}.w1/w2/w3``, lm_head."""
    if not name.endswith(".weight") or len(shape) != 2:
        return False
    module = module_of(name)
    leaf = module.rsplit(".", 1)[-1]
    return leaf in LINEAR_LEAVES or module == "lm_head" or (leaf in EXPERT_LEAVES and ".experts." in module)


def never_fp8(module: str) -> bool:
    """Embeddings, norms and routers stay in the source dtype (FORMAT.md)."""
    leaf = module.rsplit(".", 1)[-1]
    return leaf == "embed_tokens" or "norm" in leaf or leaf in archs.never_quantized_leaves()
