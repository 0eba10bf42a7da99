"""config.json read without transformers reads the same dims as transformers' class, or is not used."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig

from megatron_fp8pb.archs import dims_from_hf, supported, tiny_config
from megatron_fp8pb.hf_config_json import JsonConfig
from megatron_fp8pb.hf_output import config_json
from megatron_fp8pb.hf_source import hf_config


def _saved(tmp_path, cfg, drop=()):
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    for k in drop:
        data.pop(k, None)
    (tmp_path / "config.json").write_text(json.dumps(data))
    return tmp_path


# qwen3_moe's class reads num_experts through an attribute alias the file does not spell out: transformers reads it
ALIASED = {"qwen3_moe"}


@pytest.mark.parametrize("model_type", supported())
def test_saved_configs_read_without_transformers_give_the_same_dims(tmp_path, model_type):
    cfg = tiny_config(model_type, False)
    path = _saved(tmp_path, cfg)
    view = hf_config(path)
    if model_type in ALIASED:
        assert not isinstance(view, JsonConfig)
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
