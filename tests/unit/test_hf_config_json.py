"""config.json read without transformers reads the same dims as transformers' class, or is not used."""
from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig

from megatron_fp8pb.archs import dims_from_hf, supported, tiny_config
from megatron_fp8pb.sources.hf_config import JsonConfig
from megatron_fp8pb.output.hf_files import config_json
from megatron_fp8pb.sources.hf import hf_config


def _saved(tmp_path, cfg, drop=()):
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    for k in drop:
        data.pop(k, None)
    (tmp_path / "config.json").write_text(json.dumps(data))
    return tmp_path


# qwen3_moe's class reads num_experts through an attribute alias the file does not spell out: transformers reads it
ALIASED = {"qwen3_moe"}
# vision-language configs (text_config + vision_config): transformers' class reads them
NESTED = {"qwen3_5_moe"}


@pytest.mark.parametrize("model_type", supported())
def test_saved_configs_read_without_transformers_give_the_same_dims(tmp_path, model_type):
    cfg = tiny_config(model_type, False)
    path = _saved(tmp_path, cfg)
    view = hf_config(path)
    if model_type in ALIASED:
        assert not isinstance(view, JsonConfig)
        return
    if model_type in NESTED:
        assert not isinstance(view, JsonConfig)
        out = tmp_path / "out"
        out.mkdir()
        (out / "config.json").write_bytes(config_json(view, 1000, False, torch.bfloat16, None))
        written = json.loads((out / "config.json").read_text())
        assert "vocab_size" not in written and written["text_config"]["vocab_size"] == 1000
        assert dims_from_hf(AutoConfig.from_pretrained(out)) == replace(dims_from_hf(view), vocab=1000)
        return
    assert isinstance(view, JsonConfig), f"{model_type}: fell back to transformers"
    assert dims_from_hf(view) == dims_from_hf(AutoConfig.from_pretrained(path))
    # the written config.json loads in transformers to the same dims as the one written through the class
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_bytes(config_json(view, 1000, False, torch.bfloat16, None))
    assert dims_from_hf(AutoConfig.from_pretrained(out)) == replace(dims_from_hf(AutoConfig.from_pretrained(path)),
                                                                    vocab=1000)


def test_absent_head_dim_follows_the_class_default(tmp_path):
    (tmp_path / "l").mkdir()
    llama = hf_config(_saved(tmp_path / "l", tiny_config("llama", False), drop=("head_dim",)))
    assert isinstance(llama, JsonConfig)        # llama: hidden // heads, in transformers and here
    assert dims_from_hf(llama).head_dim == dims_from_hf(AutoConfig.from_pretrained(tmp_path / "l")).head_dim
    (tmp_path / "q").mkdir()
    qwen3 = hf_config(_saved(tmp_path / "q", tiny_config("qwen3", False), drop=("head_dim",)))
    assert not isinstance(qwen3, JsonConfig)    # qwen3's class default (128) is its own: transformers reads it
    assert dims_from_hf(qwen3).head_dim == 128


def test_deepseek_without_first_k_dense_replace_uses_transformers(tmp_path):
    cfg = hf_config(_saved(tmp_path, tiny_config("deepseek_v3", False), drop=("first_k_dense_replace",)))
    assert not isinstance(cfg, JsonConfig)


KIMI_K2 = {"model_type": "kimi_k2", "vocab_size": 163840, "hidden_size": 7168, "intermediate_size": 18432,
           "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 64,
           "num_key_value_heads": 64, "n_shared_experts": 1, "n_routed_experts": 384, "num_experts_per_tok": 8,
           "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "q_lora_rank": 1536, "kv_lora_rank": 512,
           "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128, "routed_scaling_factor": 2.827,
           "norm_topk_prob": True, "num_nextn_predict_layers": 0, "moe_layer_freq": 1, "rms_norm_eps": 1e-6,
           "rope_theta": 50000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
           "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}}


def test_a_model_type_transformers_does_not_know_is_read_from_config_json(tmp_path):
    """Kimi-K2 (model_type kimi_k2: DeepSeek-V3's layout, the checkpoint's own code): read without transformers;
    a key the architecture needs, or one transformers' class would default, is named when missing."""
    (tmp_path / "config.json").write_text(json.dumps(KIMI_K2))
    d = dims_from_hf(hf_config(tmp_path))
    assert (d.num_experts, d.q_lora_rank, d.kv_lora_rank, d.router_scale, d.mtp_layers) == (384, 1536, 512, 2.827, 0)
    for key, said in (("v_head_dim", "it lacks 'v_head_dim', which the architecture needs"),
                      ("routed_scaling_factor", "it lacks ['routed_scaling_factor'], for which transformers' own "
                                                "class would have defaults")):
        (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in KIMI_K2.items() if k != key}))
        with pytest.raises(ValueError, match=re.escape(f"model_type 'kimi_k2' is not one transformers knows, so "
                                                       f"the export reads config.json itself, and {said}")):
            hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**KIMI_K2, "model_type": "no_such_model"}))
    with pytest.raises(ValueError, match="architecture 'no_such_model' is not supported; supported model_type"):
        hf_config(tmp_path)
