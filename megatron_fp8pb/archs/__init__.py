"""Architecture registry: HF ``model_type`` -> (Dims reader, rule table)."""
from __future__ import annotations

from . import dense
from .base import Dims, Rule

_DENSE = ("llama", "mistral", "qwen2", "qwen3")


def supported() -> tuple[str, ...]:
    from . import moe
    return _DENSE + moe.MODEL_TYPES


def dims_from_hf(cfg) -> Dims:
    mt = getattr(cfg, "model_type", None)
    if mt in _DENSE:
        return dense.dims_from_hf(cfg)
    from . import moe
    if mt in moe.MODEL_TYPES:
        return moe.dims_from_hf(cfg)
    raise ValueError(f"architecture {mt!r} is not supported; supported model_type values: {', '.join(supported())}")


def rules_for(d: Dims) -> list[Rule]:
    if d.num_experts:
        from . import moe
        return moe.rules(d)
    return dense.rules(d)


__all__ = ["Dims", "Rule", "dims_from_hf", "rules_for", "supported"]
