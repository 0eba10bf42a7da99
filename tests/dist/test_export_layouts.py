"""The central invariant through the real CLI (launch/export.py on gloo process groups of torchrun processes):
every exported tensor is byte-identical to quantizing the source HF tensor in one process, for TP/PP layouts whose
shards are not multiples of 128 (hidden 320, intermediate 704, head_dim 80, vocab 1003). The module's exports run in
one torchrun launch (tests/jobs.py), each on a process group of its own world size."""
import json

import pytest
import transformers as tf

from helpers import RAGGED_DIMS as RAGGED
from helpers import mismatches
from jobs import Job


def _llama(tie=False):
    return tf.LlamaConfig(num_key_value_heads=2, head_dim=80, tie_word_embeddings=tie, **RAGGED)


def _qwen2(tie=True):
    return tf.Qwen2Config(num_key_value_heads=4, tie_word_embeddings=tie, **RAGGED)


def _qwen3(tie=False):
    return tf.Qwen3Config(num_key_value_heads=2, head_dim=64, tie_word_embeddings=tie, **RAGGED)


CASES = [  # (name, config, tp, pp)
    ("llama-untied-tp2", _llama, 2, 1),
    ("llama-untied-tp2pp2", _llama, 2, 2),
    ("qwen2-bias-tied-tp4", _qwen2, 4, 1),
    ("qwen2-bias-tied-pp2", _qwen2, 1, 2),
    ("qwen3-qknorm-tp1", _qwen3, 1, 1),
]

JOBS = {
    **{f"test_export_byte_identical[{name}]": Job(tp * pp, [f"parallel.tp={tp}", f"parallel.pp={pp}",
                                                             "output.max_shard_size=1MB"], make())
       for name, make, tp, pp in CASES},
    "test_unquantized_export_is_the_source": Job(2, ["parallel.tp=2", "quant.enabled=false"], _qwen3(tie=True)),
    "test_tied_model_with_quantized_lm_head_is_untied": Job(2, ["parallel.tp=2", "quant.lm_head=true"],
                                                            _qwen2(tie=True)),
    "test_serve_tp_keeps_refused_layers_unquantized": Job(2, ["parallel.tp=2", "quant.serve_tp=1"], _llama()),
    # world 4 at tp=2: two data-parallel replicas
    "test_data_parallel_replicas_write_once": Job(4, ["parallel.tp=2"], _llama()),
}


@pytest.mark.parametrize("name,make,tp,pp", CASES, ids=[c[0] for c in CASES])
def test_export_byte_identical(exported, name, make, tp, pp):
    assert exported.returncode == 0, exported.log()
    out = exported.out
    assert mismatches(out, exported.state) == []
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 1003
    assert cfg["tie_word_embeddings"] == make().tie_word_embeddings
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    assert "lm_head" in cfg["quantization_config"]["modules_to_not_convert"]
    assert json.loads((out / "generation_config.json").read_text()) == {"max_new_tokens": 7}
    assert ("lm_head.weight" in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) != \
        make().tie_word_embeddings


def test_unquantized_export_is_the_source(exported):
    assert exported.returncode == 0, exported.log()
    assert mismatches(exported.out, exported.state, quantized=False) == []
    assert "quantization_config" not in json.loads((exported.out / "config.json").read_text())


def test_tied_model_with_quantized_lm_head_is_untied(exported):
    assert exported.returncode == 0, exported.log()
    r, out, state = exported, exported.out, exported.state
    assert "untie" in r.stdout or "tie_word_embeddings=false" in r.stdout
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    assert mismatches(out, state) == []
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    assert "lm_head" not in cfg["quantization_config"]["modules_to_not_convert"]


def test_serve_tp_keeps_refused_layers_unquantized(exported):
    assert exported.returncode == 0, exported.log()
    r, out, state = exported, exported.out, exported.state
    assert "quant.serve_tp=1: keeping" in r.stdout
    skip = set(json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"])
    for i in range(2):
        # q (320 rows), k/v (160), gate/up (704) are refused at tp=1; o_proj/down_proj only split inputs at tp>1
        assert {f"model.layers.{i}.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj")} <= skip
        assert {f"model.layers.{i}.mlp.{m}" for m in ("gate_proj", "up_proj")} <= skip
        assert f"model.layers.{i}.self_attn.o_proj" not in skip and f"model.layers.{i}.mlp.down_proj" not in skip
    assert mismatches(out, state) == []
    assert "serve tp=1           OK (required)" in r.stdout


def test_data_parallel_replicas_write_once(exported):
    """World 4 at tp=2: two data-parallel replicas; only the first one's shards are written."""
    assert exported.returncode == 0, exported.log()
    assert mismatches(exported.out, exported.state) == []
