"""An HF ``config.json`` read as attributes without importing transformers (several seconds of cold imports on a
fresh machine). It stands in for transformers' config class only where both read the same: every attribute the
architecture's dims read is in the file, or is one whose absence means the same default in both (``ABSENT_SAME``
and the unit's ``absent_same``).
Otherwise ``hf_source.hf_config`` loads the transformers class as before."""
from __future__ import annotations

import copy

# attributes whose absence reads the same here (the dims readers' getattr defaults) as in every family's transformers
# class; a family's own such attributes are its unit's ``absent_same`` (archs/<family>.py)
ABSENT_SAME = {"rope_theta", "rope_parameters", "num_key_value_heads", "tie_word_embeddings", "rms_norm_eps",
               "max_position_embeddings", "mlp_bias", "attention_bias", "num_nextn_predict_layers", "norm_topk_prob"}


class JsonConfig:
    """``config.json``'s keys as attributes; an absent key raises AttributeError and is remembered in ``absent``."""

    def __init__(self, data: dict):
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "absent", set())

    def __getattr__(self, name: str):
        data = object.__getattribute__(self, "data")
        if name in data:
            return data[name]
        if not name.startswith("__"):
            object.__getattribute__(self, "absent").add(name)
        raise AttributeError(name)

    def __setattr__(self, name: str, value) -> None:
        self.data[name] = value

    def __delattr__(self, name: str) -> None:
        self.data.pop(name, None)

    def __deepcopy__(self, memo):
        return JsonConfig(copy.deepcopy(self.data, memo))

    def get_text_config(self) -> "JsonConfig":
        return self

    def to_diff_dict(self) -> dict:
        return copy.deepcopy(self.data)


def reads_like_transformers(data: dict) -> JsonConfig | None:
    """The config as a JsonConfig when the architecture's dims read from it exactly what they would read from
    transformers' class (no nested text config, no absent attribute with a class default of its own); else None."""
    from megatron_fp8pb.archs import dims_from_hf
    if "text_config" in data or "model_type" not in data:
        return None
    view = JsonConfig(data)
    try:
        dims_from_hf(view)
    except Exception:       # unknown type, a refusal, a missing key: transformers' class decides and names it
        return None
    if _defaulted(view):
        return None
    view.absent.clear()
    return view


def _defaulted(view: JsonConfig) -> list[str]:
    """The attributes the dims read and found absent whose default transformers' class sets on its own."""
    from megatron_fp8pb.archs import arch
    return sorted(view.absent - ABSENT_SAME - set(arch(view.data["model_type"]).absent_same))


def missing_for_dims(data: dict) -> str:
    """Why ``config.json`` alone does not give the architecture's dims, and what to add."""
    from megatron_fp8pb.archs import dims_from_hf
    view = JsonConfig(data)
    try:
        dims_from_hf(view)
    except AttributeError as e:
        return f"it lacks {e.args[0]!r}, which the architecture needs; add it with the model's value"
    except Exception as e:      # a refusal: its own message
        return str(e)
    return (f"it lacks {_defaulted(view)}, for which transformers' own class would have defaults; add them with the "
            f"model's values")
