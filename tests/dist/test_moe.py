"""Mixture-of-experts export under expert parallelism: byte for byte against the single-process reference for
layouts whose per-rank expert sizes are not multiples of 128, every expert once, transformers loading the result."""
import json

import pytest
import transformers as tf

from helpers import mismatches, torchrun, write_hf_source
from megatron_fp8pb.tiny import tiny_hf_config
from megatron_fp8pb.verify import verify_checkpoint

RAGGED = dict(vocab_size=1003, hidden_size=320, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=80, max_position_embeddings=256)


def _qwen3_moe():   # moe_intermediate 320: 160 rows per rank at etp=2
    return tf.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=320, intermediate_size=640,
                             mlp_only_layers=[], decoder_sparse_step=1, **RAGGED)


def _mixtral():
    return tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, intermediate_size=320, **RAGGED)


LAYOUTS = [(1, 2, 1, 1), (2, 2, 1, 1), (1, 2, 2, 1), (1, 2, 1, 2)]   # (tp, ep, etp, pp)


@pytest.mark.parametrize("tp,ep,etp,pp", LAYOUTS, ids=[f"tp{a}ep{b}etp{c}pp{d}" for a, b, c, d in LAYOUTS])
def test_qwen3_moe_byte_identical(tmp_path, tp, ep, etp, pp):
    src = tmp_path / "src"
    state = write_hf_source(src, _qwen3_moe())
    out = tmp_path / "out"
    world = max(tp, ep * etp) * pp
    r = torchrun(world, ["source.kind=hf", f"source.path={src}", f"parallel.tp={tp}", f"parallel.ep={ep}",
                         f"parallel.etp={etp}", f"parallel.pp={pp}", f"output.dir={out}", "output.max_shard_size=1MB"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert mismatches(out, state) == []
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for i in range(2):
        experts = sorted({int(n.split(".")[5]) for n in index if n.startswith(f"model.layers.{i}.mlp.experts.")})
        assert experts == [0, 1, 2, 3]
    skip = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert "model.layers.0.mlp.gate" in skip and index["model.layers.0.mlp.gate.weight"]


def test_mixtral_names_and_bytes(tmp_path):
    src = tmp_path / "src"
    state = write_hf_source(src, _mixtral())
    out = tmp_path / "out"
    r = torchrun(2, ["source.kind=hf", f"source.path={src}", "parallel.ep=2", "parallel.etp=1", f"output.dir={out}"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert mismatches(out, state) == []
    names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight_scale_inv" in names


def test_missing_expert_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    src = tmp_path / "src"
    write_hf_source(src, _qwen3_moe())
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    f = src / index["weight_map"][name]
    tensors = load_file(str(f))
    del tensors[name]
    save_file(tensors, str(f))
    r = torchrun(2, ["source.kind=hf", f"source.path={src}", "parallel.ep=2", f"output.dir={tmp_path / 'out'}"])
    assert r.returncode != 0 and name in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_transformers_loads_moe_logits(tmp_path, arch):
    src = tmp_path / "src"
    write_hf_source(src, tiny_hf_config(arch))
    out = tmp_path / "out"
    r = torchrun(2, ["source.kind=hf", f"source.path={src}", "parallel.ep=2", f"output.dir={out}"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = verify_checkpoint(out, source=src, logits=True)
    assert report.ok, report.table()
    assert report.logits["rel_err"] < 0.1 and report.logits["top1"] >= 0.9, report.logits
