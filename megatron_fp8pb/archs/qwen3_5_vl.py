"""Qwen3.5-MoE's vision-language checkpoint (``model_type: qwen3_5_moe``, transformers'
``Qwen3_5MoeForConditionalGeneration``): its language model exported as Qwen3.5-MoE's text model is, under
``model.language_model.`` (``lm_head`` at the top), and the vision tower with its projector (``model.visual.``)
carried over unquantized, each tensor in the dtype and with the bytes the source stores.

The vision tensors are named and shaped from ``vision_config`` by transformers' own vision model, built on the meta
device (no weights), so a source missing one of them is refused as for any other tensor. Their linears (attention
``qkv`` / ``proj``, the MLPs' ``linear_fc1`` / ``linear_fc2``, the projector's ``merger.*``) are listed by full name
in ``modules_to_not_convert``: vLLM builds the vision tower with the checkpoint's quantization config (its
``Qwen3_VisionTransformer`` gets ``quant_config``) and would otherwise look for FP8 weights there, and transformers
would replace them with FP8 linears. The patch embedding (a Conv3d) and the position embedding are no linears.

The config keeps its vision-language structure (``text_config``, ``vision_config``, the image and video token ids)
with ``quantization_config`` at the top level, where servers and transformers read it. The vision tower exists only
in HF checkpoints: a Megatron source (``GPTModel``) holds the language model alone and is refused for the tower's
tensors by name.
"""
from __future__ import annotations

from dataclasses import replace

from . import qwen3_next as text
from .base import GLOBAL, REPLICATED, Arch, Dims, Rule

LM = "model.language_model."
VISUAL = "model.visual."
MC_VISUAL = "vision_model."     # the carried tensors' names on the exporter's side (no Megatron module holds them)


def _sub(cfg, name: str, cls_name: str):
    sub = getattr(cfg, name)
    if isinstance(sub, dict):
        import transformers as tf
        sub = getattr(tf, cls_name)(**sub)
    return sub


def vision_tensors(vision_config) -> tuple[tuple[str, tuple[int, ...], bool], ...]:
    """(HF name, shape, is a linear weight) of every tensor of the vision tower ``vision_config`` describes, as
    transformers' vision model names them, in its order."""
    import torch
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeVisionModel
    with torch.device("meta"):
        tower = Qwen3_5MoeVisionModel(vision_config)
    linear = {f"{n}.weight" for n, m in tower.named_modules() if isinstance(m, torch.nn.Linear)}
    return tuple((VISUAL + n, tuple(t.shape), n in linear) for n, t in tower.state_dict().items())


def dims(cfg) -> Dims:
    if getattr(cfg, "text_config", None) is None or getattr(cfg, "vision_config", None) is None:
        raise ValueError(f"{cfg.model_type}: the vision-language config needs text_config and vision_config")
    tc = _sub(cfg, "text_config", "Qwen3_5MoeTextConfig")
    vc = _sub(cfg, "vision_config", "Qwen3_5MoeVisionConfig")
    out = int(getattr(vc, "out_hidden_size", tc.hidden_size))
    if out != tc.hidden_size:
        raise ValueError(f"{cfg.model_type}: vision_config.out_hidden_size({out}) != text_config.hidden_size"
                         f"({tc.hidden_size}); the projector must feed the language model")
    d = text.dims(tc)
    return replace(d, model_type=cfg.model_type, carried=vision_tensors(vc),
                   tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", d.tie_embeddings)))


def lm_name(hf_name: str) -> str:
    """A text model's HF name -> the language model's inside the vision-language checkpoint."""
    if hf_name.startswith("model."):
        return LM + hf_name[len("model."):]
    return hf_name


def _shape(shape):
    return lambda d: (shape,)


def carried_rules(d: Dims) -> list[Rule]:
    """One rule per vision tensor: replicated, never quantized, written as the source stores it."""
    return [Rule((MC_VISUAL + name[len(VISUAL):],), (name,), _shape(shape), REPLICATED, linear=linear, scope=GLOBAL,
                 as_stored=True) for name, shape, linear in d.carried]


def rules(d: Dims) -> list[Rule]:
    lm = [replace(r, hf=tuple(lm_name(h) for h in r.hf)) for r in text.rules(d)]
    return lm + carried_rules(d)


def _tiny(tie: bool = False, **kw):
    """The text model of ``qwen3_5_moe_text``'s tiny config (hidden 320) under a vision tower of 2 blocks, hidden 96
    (qkv 288 rows, 2 heads of 48), MLP 200, patches 8 x 8 x 2, a projector 384 -> 320: no dim a multiple of 128.
    ``kw``: text config fields, and ``vision`` a dict of vision config fields."""
    import transformers as tf
    vision = dict(depth=2, hidden_size=96, intermediate_size=200, num_heads=2, out_hidden_size=320, patch_size=8,
                  temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=64, in_channels=3)
    vision.update(kw.pop("vision", {}))
    tc = text.QWEN3_5_MOE.tiny["qwen3_5_moe_text"](tie, **kw)
    vision["out_hidden_size"] = tc.hidden_size
    return tf.Qwen3_5MoeConfig(text_config=tc.to_dict(), vision_config=vision, tie_word_embeddings=tie)


_base = text.QWEN3_5_MOE
QWEN3_5_MOE_VL = Arch(
    model_types=("qwen3_5_moe",), dims=dims, rules=rules, serving=_base.serving, fusion=_base.fusion,
    kv_leaves=_base.kv_leaves, never_quantized=_base.never_quantized,
    exclude=tuple(lm_name(p) for p in _base.exclude) + (VISUAL + "*",), block_spec=True,
    tiny={"qwen3_5_moe": _tiny})
UNITS = (QWEN3_5_MOE_VL,)
