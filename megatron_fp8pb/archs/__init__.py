"""Architecture registry: HF ``model_type`` -> its unit (``archs/<family>.py``). Everything else asks here: Dims and
rules (plan), serving styles and fusion groups (verify, serve-check), default excludes, megatron-core arguments,
tiny and preset configs. Adding an architecture = one file listed in ``_FAMILIES`` plus its tests."""
from __future__ import annotations

import importlib

from .base import COLUMN, ROW, Arch, Dims, Rule

_FAMILIES = ("llama", "qwen", "qwen_moe", "mixtral", "deepseek", "glm4_moe", "qwen3_next", "qwen3_5_vl", "minimax_m2",
             "dsa")


def _units() -> list[Arch]:
    out = []
    for fam in _FAMILIES:
        out += list(importlib.import_module(f"{__name__}.{fam}").UNITS)
    return out


def registry() -> dict[str, Arch]:
    return {mt: a for a in _units() for mt in a.model_types + a.also_reads}


def supported() -> tuple[str, ...]:
    """The model_type values with a transformers class (what the tests cover one by one)."""
    return tuple(mt for a in _units() for mt in a.model_types)


def arch(model_type: str) -> Arch:
    reg = registry()
    if model_type not in reg:
        raise ValueError(f"architecture {model_type!r} is not supported; supported model_type values: "
                         f"{', '.join(reg)}")
    return reg[model_type]


def dims_from_hf(cfg) -> Dims:
    return arch(getattr(cfg, "model_type", None)).dims(cfg)


def rules_for(d: Dims) -> list[Rule]:
    return arch(d.model_type).rules(d)


def default_exclude(d: Dims) -> tuple[str, ...]:
    return arch(d.model_type).exclude


def serving_styles() -> dict[str, str]:
    """HF linear leaf -> "column" / "row" / "replicated" over every registered architecture (servers shard a leaf
    the same way in every model that has it)."""
    out: dict[str, str] = {}
    for a in _units():
        out.update(a.serving)
    return out


def linear_leaves() -> tuple[str, ...]:
    """Leaves of the HF linears the format quantizes (FP8 candidates), over every registered architecture."""
    return tuple(serving_styles())


def leaves_with_style(style: str) -> tuple[str, ...]:
    return tuple(k for k, v in serving_styles().items() if v == style)


def expert_only_leaves() -> tuple[str, ...]:
    """Linear leaves that exist only inside experts (``experts.{e}.w1``)."""
    return tuple(x for a in _units() for x in a.expert_leaves)


def kv_leaves() -> tuple[str, ...]:
    return tuple(sorted({x for a in _units() for x in a.kv_leaves}))


def never_quantized_leaves() -> tuple[str, ...]:
    return tuple(sorted({x for a in _units() for x in a.never_quantized}))


def fusion_groups() -> tuple[tuple[str, ...], ...]:
    seen: list[tuple[str, ...]] = []
    for a in _units():
        seen += [g for g in a.fusion if g not in seen]
    return tuple(seen)


def tiny_names() -> tuple[str, ...]:
    """The architectures with an embedded tiny model (``source.kind=tiny``)."""
    return tuple(n for a in _units() for n in a.tiny)


def tiny_config(name: str, tie_embeddings: bool = False):
    for a in _units():
        if name in a.tiny:
            return a.tiny[name](tie_embeddings)
    raise ValueError(f"source.arch={name!r} has no tiny model; choose one of {', '.join(tiny_names())}")


def presets() -> dict[str, tuple[str, object]]:
    """Preset name -> (model_type, factory(num_layers))."""
    return {n: (a.model_types[0], f) for a in _units() for n, f in a.presets.items()}


__all__ = ["Arch", "COLUMN", "Dims", "ROW", "Rule", "arch", "default_exclude", "dims_from_hf", "expert_only_leaves",
           "fusion_groups",
           "kv_leaves", "leaves_with_style", "linear_leaves", "never_quantized_leaves", "presets", "registry",
           "rules_for", "serving_styles", "supported", "tiny_config", "tiny_names"]
