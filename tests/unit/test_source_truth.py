"""What the output claims about the source stays true: config.json's multi-token-prediction count is the number of
MTP layers written, and source tensors the architecture does not map are named in a warning, not dropped silently."""
import json

import torch
import transformers as tf
from safetensors.torch import save_file

from megatron_fp8pb.archs import dims_from_hf, rules_for
from megatron_fp8pb.output.hf_files import config_json
from megatron_fp8pb.sources.hf import HFReader, check_source
from megatron_fp8pb.plan.params import expected_tensors
from megatron_fp8pb.sources.tiny import tiny_hf_config


def test_config_json_counts_the_mtp_layers_written():
    cfg = tiny_hf_config("glm4_moe")
    cfg.num_nextn_predict_layers = 1          # transformers' default for GLM-4.5
    d = dims_from_hf(cfg)
    assert d.mtp_layers == 1
    out = json.loads(config_json(cfg, d.vocab, False, torch.bfloat16, None, d.mtp_layers))
    assert out["num_nextn_predict_layers"] == 1
    out = json.loads(config_json(cfg, d.vocab, False, torch.bfloat16, None, 0))     # a source without them
    assert out["num_nextn_predict_layers"] == 0
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
    """What a loader or a user reads beside the weights is carried over: tokenizer and its model files, chat template,
    the code config.json's and tokenizer_config.json's auto_map name, model card and license. Nothing else: not
    weights, indexes, config.json (written anew), other code, or whatever else shares the directory."""
    from megatron_fp8pb.output.hf_files import source_side_files
    keep = ["generation_config.json", "tiktoken.model", "tokenization_kimi.py", "configuration_deepseek.py",
            "LICENSE", "README.md", "chat_template.jinja", "vocab.json", "merges.txt", "special_tokens_map.json"]
    drop = ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json", ".gitattributes", "train.py", "notes.txt", "metadata.json", "common.pt"]
    for name in keep + drop:
        (tmp_path / name).write_text(name)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "kimi_k2", "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config"}}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"auto_map": {
        "AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}}))
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "tokenizer.model").write_text("x")
    assert sorted(source_side_files(tmp_path)) == sorted(keep + ["tokenizer_config.json"])
    assert source_side_files(tmp_path / "config.json") == source_side_files(tmp_path)
