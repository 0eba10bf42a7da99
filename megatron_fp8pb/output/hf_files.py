"""The non-tensor files of the output: config.json with quantization_config, generation config, tokenizer."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from megatron_fp8pb.quant.format import FORMAT


def quantization_config(not_converted: list[str], quantized_any: bool, scale_fmt: str = "amax") -> dict | None:
    """FORMAT.md's quantization_config; ``"scale_fmt": "ue8m0"`` only in that mode (amax/448 scales write no key)."""
    if not quantized_any:
        return None
    return FORMAT.quantization_config(not_converted, scale_fmt)


def config_json(hf_config, vocab: int, tie: bool, dtype: torch.dtype, qconfig: dict | None,
                mtp_layers: int | None = None) -> bytes:
    """The output's config.json: the source config with the real vocab, the truth about tying and about
    multi-token-prediction layers, and ``quantization_config``.

    The source config is its transformers class, or ``config.json`` as read (``hf_config_json``);
    ``num_nextn_predict_layers`` is the ``mtp_layers`` written."""
    cfg = copy.deepcopy(hf_config)
    nested = getattr(cfg, "text_config", None) is not None     # a vision-language config: vocab in text_config
    if not nested:
        cfg.vocab_size = vocab
    cfg.tie_word_embeddings = tie
    if hasattr(cfg, "get_text_config"):
        cfg.get_text_config().tie_word_embeddings = tie
        if nested:
            cfg.get_text_config().vocab_size = vocab
    cfg.dtype = dtype
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    d = cfg.to_diff_dict()
    if not d.get("architectures"):
        from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                            MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
        arch = (MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES if nested else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                ).get(cfg.model_type)
        d["architectures"] = [arch] if arch else None
    d["model_type"] = cfg.model_type
    d["tie_word_embeddings"] = tie
    if not nested:
        d["vocab_size"] = vocab
    if mtp_layers is not None and getattr(cfg, "num_nextn_predict_layers", None) not in (None, mtp_layers):
        d["num_nextn_predict_layers"] = mtp_layers
    d["torch_dtype"] = d["dtype"] = str(dtype).replace("torch.", "")
    if qconfig is not None:
        d["quantization_config"] = qconfig
    else:
        d.pop("quantization_config", None)
    return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()


CARRIED = ("generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*",
           "merges.txt", "*.tiktoken", "tiktoken.model", "*.jinja", "chat_template.json", "LICENSE*", "NOTICE*",
           "README*", "USE_POLICY*")      # fnmatch patterns of the source files carried over


def _auto_map_modules(src: Path) -> set[str]:
    """The ``.py`` files that config.json's and tokenizer_config.json's ``auto_map`` name (a checkpoint's own code)."""
    out = set()
    for name in ("config.json", "tokenizer_config.json"):
        try:
            auto = json.loads((src / name).read_text()).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue
        for ref in auto.values():
            for r in ref if isinstance(ref, list) else [ref]:
                if isinstance(r, str) and "." in r:
                    out.add(r.split("--")[-1].rsplit(".", 1)[0] + ".py")
    return out


def source_side_files(src: str | Path | None) -> dict[str, Path]:
    """The files of an HF source directory that the export carries over beside its own config.json and weights: the
    generation config, the tokenizer and its model files (sentencepiece, tiktoken), chat templates, the code that
    ``auto_map`` names, the model card and license (``CARRIED``)."""
    from fnmatch import fnmatch
    if not src:
        return {}
    src = Path(src)
    if src.is_file():
        src = src.parent
    code = _auto_map_modules(src)
    out = {}
    for f in sorted(src.iterdir()):
        if f.is_file() and (f.name in code or any(fnmatch(f.name, pat) for pat in CARRIED)):
            out[f.name] = f
    return out
