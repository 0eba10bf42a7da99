"""What the output claims about the source stays true: config.json's multi-token-prediction count is the number of
MTP layers written, and source tensors the architecture does not map are named in a warning, not dropped silently."""
import json

import torch
import transformers as tf
from safetensors.torch import save_file

from megatron_fp8pb.archs import dims_from_hf, rules_for
from megatron_fp8pb.hf_output import config_json
from megatron_fp8pb.hf_source import HFReader, check_source
from megatron_fp8pb.plan import expected_tensors
from megatron_fp8pb.tiny import tiny_hf_config


def test_config_json_counts_the_mtp_layers_written():
    cfg = tiny_hf_config("glm4_moe")
    assert cfg.num_nextn_predict_layers == 1          # transformers' default for GLM-4.5
    d = dims_from_hf(cfg)
    out = json.loads(config_json(cfg, d.vocab, False, torch.bfloat16, None, d.mtp_layers))
    assert out["num_nextn_predict_layers"] == d.mtp_layers == 0
    llama = json.loads(config_json(tf.LlamaConfig(vocab_size=1003), 1003, False, torch.bfloat16, None, 0))
    assert "num_nextn_predict_layers" not in llama


def test_unmapped_source_tensors_are_named(tmp_path, capsys):
    cfg = tf.LlamaConfig(vocab_size=1003, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    d = dims_from_hf(cfg)
    expected = expected_tensors(rules_for(d), d)
    state = {n: torch.zeros(s, dtype=torch.bfloat16) for n, s in expected.items()}
    state["model.layers.1.eh_proj.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    check_source(HFReader(tmp_path), expected, str(tmp_path))
    err = capsys.readouterr().err
    assert "holds 1 tensor(s) the architecture's table does not map" in err and "model.layers.1.eh_proj.weight" in err


def test_the_source_side_files_carried_over(tmp_path):
    """Everything beside the weights that a loader or a user reads (tokenizer and its model files, the custom code
    config.json's auto_map names, the model card and license) is carried over; weights, their indexes, config.json
    (written anew), hidden files, subdirectories and a Megatron checkpoint's own files are not."""
    from megatron_fp8pb.hf_output import source_side_files
    keep = ["generation_config.json", "tokenizer_config.json", "tiktoken.model", "tokenization_kimi.py",
            "configuration_deepseek.py", "LICENSE", "README.md", "chat_template.jinja"]
    drop = ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json", ".gitattributes"]
    for name in keep + drop:
        (tmp_path / name).write_text(name)
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "params.json").write_text("{}")
    assert sorted(source_side_files(tmp_path)) == sorted(keep)
    assert source_side_files(tmp_path / "config.json") == source_side_files(tmp_path)
    ckpt = tmp_path / "ckpt"            # source.hf_config pointing into a Megatron dist checkpoint
    ckpt.mkdir()
    for name in (".metadata", "metadata.json", "common.pt", "__0_0.distcp", "config.json"):
        (ckpt / name).write_text(name)
    assert source_side_files(ckpt) == {}
