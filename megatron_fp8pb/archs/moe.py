"""Mixture-of-experts tables (filled in by the MoE support)."""
MODEL_TYPES: tuple[str, ...] = ()


def dims_from_hf(cfg):  # pragma: no cover - replaced with the MoE tables
    raise ValueError(f"architecture {cfg.model_type!r} is not supported")


def rules(d):  # pragma: no cover
    raise ValueError(f"architecture {d.model_type!r} is not supported")
