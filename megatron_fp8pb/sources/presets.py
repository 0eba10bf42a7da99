"""Real architectures' shapes (random weights) for benchmarks and layout checks: ``source.kind=random``. Each
architecture unit in ``archs/`` owns its presets; this module only looks them up."""
from __future__ import annotations

from megatron_fp8pb.archs import presets as _presets

PRESETS = {name: model_type for name, (model_type, _) in _presets().items()}


def preset_hf_config(name: str, num_layers: int = 0):
    """The transformers config of a preset; ``num_layers`` > 0 keeps only that many layers."""
    table = _presets()
    if name not in table:
        raise ValueError(f"source.arch={name!r} is not a preset; choose one of {', '.join(table)}")
    return table[name][1](num_layers)
