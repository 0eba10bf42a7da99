"""Mixture-of-experts export under expert parallelism through the real CLI (torchrun + gloo + megatron-core
GPTModel with SequentialMLP experts): byte for byte against the single-process reference for layouts whose per-rank
expert sizes are not multiples of 128, every expert exactly once, and transformers loading every per-expert FP8
tensor of Qwen3-MoE, Qwen2-MoE (shared expert) and Mixtral with logits that match the source. The module's exports
run from one torchrun launch (tests/jobs.py), each in processes of its own world size."""
import json
import re

import pytest
import torch
import transformers as tf

from helpers import drop_source_tensor
from helpers import mismatches, ragged_qwen3_moe, read_output
from jobs import Job
from megatron_fp8pb.quant.reference import dequantize_blockfp8
from megatron_fp8pb.sources.tiny import tiny_hf_config
from megatron_fp8pb.verify import verify_checkpoint


def _experts_per_layer(names) -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for n in names:
        m = re.match(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.[a-z0-9_]+\.weight$", n)
        if m:
            found.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    return {i: sorted(e) for i, e in sorted(found.items())}


LAYOUTS = [(1, 2, 1, 1, 2), (2, 2, 1, 1, 4), (1, 2, 2, 1, 4), (1, 2, 1, 2, 4)]   # (tp, ep, etp, pp, world)
LAYOUT_IDS = [f"tp{a}ep{b}etp{c}pp{d}" for a, b, c, d, _ in LAYOUTS]

EXPERT_LEAVES = {"qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
                 "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
                 "mixtral": ("block_sparse_moe", "w1", "w3", "w2")}

TRANSFORMERS_CASES = [  # (arch, parallel overrides): world 2 each
    ("qwen3_moe", ["parallel.ep=2"]),
    ("qwen2_moe", ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1"]),   # shared expert split along tp
    ("mixtral", ["parallel.ep=2", "parallel.etp=1"]),
]

MISSING_EXPERT = "model.layers.1.mlp.experts.2.down_proj.weight"

JOBS = {
    **{f"test_qwen3_moe_byte_identical[{i}]": Job(world, [f"parallel.tp={tp}", f"parallel.ep={ep}",
                                                          f"parallel.etp={etp}", f"parallel.pp={pp}",
                                                          "output.max_shard_size=1MB"], ragged_qwen3_moe())
       for i, (tp, ep, etp, pp, world) in zip(LAYOUT_IDS, LAYOUTS)},
    **{f"test_transformers_loads_moe[{arch}]": Job(2, args, tiny_hf_config(arch)) for arch, args in TRANSFORMERS_CASES},
    "test_missing_expert_is_named": Job(2, ["parallel.ep=2"], ragged_qwen3_moe(),
                                        edit=lambda src: drop_source_tensor(src, MISSING_EXPERT)),
}


@pytest.mark.parametrize("tp,ep,etp,pp,world", LAYOUTS, ids=LAYOUT_IDS)
def test_qwen3_moe_byte_identical(exported, tp, ep, etp, pp, world):
    """(2,2,1,1) at world 4 has two data-parallel and two expert-data-parallel replicas: each expert written once."""
    assert exported.returncode == 0, exported.log()
    out, state = exported.out, exported.state
    assert mismatches(out, state) == []
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert _experts_per_layer(index) == {i: [e for e in range(4) for _ in range(3)] for i in range(2)}
    skip = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert {"model.layers.0.mlp.gate", "model.layers.1.mlp.gate"} <= set(skip)
    assert index["model.layers.0.mlp.gate.weight"] and "model.layers.0.mlp.gate.weight_scale_inv" not in index


def test_missing_expert_is_named(exports):
    r = exports["test_missing_expert_is_named"]
    assert r.returncode != 0 and MISSING_EXPERT in r.stderr
    assert not r.out.exists()


def _check_transformers_loads_every_expert(out, arch: str) -> None:
    """transformers fuses the per-expert tensors into ``mlp.experts.gate_up_proj`` [E, 2I, H] and ``down_proj``
    [E, H, I] at load time: nothing may be missing or unexpected, and each fused slice must be exactly the
    dequantization of that expert's FP8 weight with its own weight_scale_inv."""
    model, info = tf.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, device_map="cpu",
                                                          output_loading_info=True)
    assert not any(info.values()), info
    got, params = read_output(out), dict(model.named_parameters())
    block, gate, up, down = EXPERT_LEAVES[arch]

    def deq(i, e, leaf):
        w = f"model.layers.{i}.{block}.experts.{e}.{leaf}.weight"
        return dequantize_blockfp8(got[w], got[w + "_scale_inv"], dtype=torch.float32)

    for i in range(2):
        fused = params[f"model.layers.{i}.mlp.experts.gate_up_proj"]
        for e in range(4):
            assert torch.equal(fused[e], torch.cat([deq(i, e, gate), deq(i, e, up)])), (i, e)
            assert torch.equal(params[f"model.layers.{i}.mlp.experts.down_proj"][e], deq(i, e, down)), (i, e)


@pytest.mark.parametrize("arch,args", TRANSFORMERS_CASES, ids=[c[0] for c in TRANSFORMERS_CASES])
def test_transformers_loads_moe(exported, arch, args):
    assert exported.returncode == 0, exported.log()
    src, out, state = exported.src, exported.out, exported.state
    assert mismatches(out, state) == []
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    block, gate, up, down = EXPERT_LEAVES[arch]
    assert f"model.layers.1.{block}.experts.3.{down}.weight_scale_inv" in index
    skip = set(json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"])
    assert {f"model.layers.{i}.{block}.gate" for i in range(2)} <= skip
    if arch == "qwen2_moe":
        assert {f"model.layers.{i}.mlp.shared_expert_gate" for i in range(2)} <= skip
        assert "model.layers.0.mlp.shared_expert.up_proj.weight_scale_inv" in index
    _check_transformers_loads_every_expert(out, arch)
    report = verify_checkpoint(out, source=src, logits=True)
    assert report.ok, report.table()
    assert report.logits["rel_err"] < 0.1 and report.logits["top1"] >= 0.9, report.logits
    assert report.logits["rel_err"] > 0.0
    assert report.logits["to_ref"] == report.logits["w8a8_to_ref"] == 0.0, report.logits
