"""The 2026 block-FP8 families through the real CLI (torchrun + gloo, HF sources streamed): DeepSeek-V3.2 and GLM-5
(sparse-attention indexer), Qwen3-Next and Qwen3.5-MoE (gated DeltaNet layers beside gated full attention),
MiniMax-M2 (full-width q/k norms). Byte for byte against the single-process reference at layouts whose per-rank
sizes are not multiples of 128; every HF tensor written exactly once, quantized where it should be and kept
byte-identical where the format keeps it; transformers loading the output and its logits against the source."""
import json

import pytest
import torch
import transformers as tf

from helpers import mismatches, read_output
from jobs import Job
from megatron_fp8pb.archs import dims_from_hf, rules_for
from megatron_fp8pb.plan.params import as_stored_tensors, expected_tensors, linear_weights
from megatron_fp8pb.sources.tiny import tiny_hf_config
from megatron_fp8pb.verify import verify_checkpoint

FAMILIES = ("deepseek_v32", "glm_moe_dsa", "qwen3_next", "qwen3_5_moe_text", "minimax_m2")
LAYOUTS = [(2, 2, 1, 1, 2), (1, 1, 1, 2, 2), (2, 1, 1, 2, 4)]   # (tp, ep, etp, pp, world)
IDS = [f"tp{a}ep{b}etp{c}pp{d}" for a, b, c, d, _ in LAYOUTS]

# leaves each family keeps in the source dtype although they are linears
KEPT = {"deepseek_v32": ("weights_proj", "gate"), "glm_moe_dsa": ("weights_proj", "gate"),
        "qwen3_next": ("in_proj_ba", "gate", "shared_expert_gate"),
        "qwen3_5_moe_text": ("in_proj_a", "in_proj_b", "gate", "shared_expert_gate"), "minimax_m2": ("gate",)}


def _loadable(arch: str):
    """The family at dims transformers' CPU dequantize reads right (quantized rows and columns multiples of 128)."""
    kw = {"deepseek_v32": dict(hidden_size=256, q_lora_rank=128, index_head_dim=128),
          "glm_moe_dsa": dict(hidden_size=256, q_lora_rank=128, index_head_dim=128),
          "qwen3_next": dict(hidden_size=256, head_dim=128, linear_key_head_dim=128, linear_value_head_dim=128,
                             moe_intermediate_size=128, shared_expert_intermediate_size=128, intermediate_size=256),
          "qwen3_5_moe_text": dict(hidden_size=256, head_dim=128, linear_key_head_dim=128, linear_value_head_dim=128,
                                   moe_intermediate_size=128, shared_expert_intermediate_size=128),
          "minimax_m2": dict(hidden_size=256, head_dim=64, intermediate_size=128)}[arch]
    from megatron_fp8pb.archs import arch as unit
    return unit(arch).tiny[arch](False, **kw)


def _ragged(cfg) -> list[str]:
    d = dims_from_hf(cfg)
    return sorted({n[:-len(".weight")] for n, s in linear_weights(rules_for(d), d).items() if s[0] % 128 or s[1] % 128})


def _check_written_once(out, cfg, state, arch):
    """Every expected HF tensor once, a scale beside every linear the format quantizes and none beside the ones it
    keeps; those kept are listed in modules_to_not_convert."""
    d = dims_from_hf(cfg)
    expected = expected_tensors(rules_for(d), d)
    assert set(expected) == set(state)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    skip = set(json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"])
    linear = {n[:-len(".weight")] for n in linear_weights(rules_for(d), d)}
    kept = {m for m in linear if m.rsplit(".", 1)[-1] in KEPT[arch]} | {"lm_head"}
    assert kept <= skip, sorted(kept - skip)
    assert skip - {"lm_head"} <= linear
    scales = {m + ".weight_scale_inv" for m in linear - skip}
    assert scales
    assert set(index) == set(expected) | scales
    got = read_output(out)
    for m in linear - skip:
        assert got[m + ".weight"].dtype == torch.float8_e4m3fn, m


def _flip_kept_dtypes(cfg):
    """``edit``: store every tensor the architecture writes as stored in another dtype than the seeded source's
    (bf16 <-> float32), so that the export must follow the source and not its own defaults."""
    from safetensors.torch import load_file, save_file

    def edit(src):
        d = dims_from_hf(cfg)
        kept = set(as_stored_tensors(rules_for(d), d))
        assert kept
        for f in src.glob("model-*.safetensors"):
            tensors = load_file(str(f))
            for n in kept & set(tensors):
                tensors[n] = tensors[n].to(torch.bfloat16 if tensors[n].dtype == torch.float32 else torch.float32)
            save_file(tensors, str(f), metadata={"format": "pt"})
    return edit


JOBS = {
    **{f"test_kept_as_stored[{arch}]": Job(2, ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1"],
                                           tiny_hf_config(arch), edit=_flip_kept_dtypes(tiny_hf_config(arch)))
       for arch in FAMILIES},
    **{f"test_byte_identical[{i}-{arch}]": Job(world, [f"parallel.tp={tp}", f"parallel.ep={ep}", f"parallel.etp={etp}",
                                                      f"parallel.pp={pp}", "output.max_shard_size=1MB"],
                                              tiny_hf_config(arch))
       for arch in FAMILIES for i, (tp, ep, etp, pp, world) in zip(IDS, LAYOUTS)},
    **{f"test_transformers_loads[{arch}]": Job(2, ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1",
                                                   *([f"quant.exclude=[{','.join(_ragged(_loadable(arch)))}]"]
                                                     if _ragged(_loadable(arch)) else [])], _loadable(arch))
       for arch in FAMILIES},
}


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("tp,ep,etp,pp,world", LAYOUTS, ids=IDS)
def test_byte_identical(exported, arch, tp, ep, etp, pp, world):
    assert exported.returncode == 0, exported.log()
    assert mismatches(exported.out, exported.state) == []
    _check_written_once(exported.out, tiny_hf_config(arch), exported.state, arch)


@pytest.mark.parametrize("arch", FAMILIES)
def test_kept_as_stored(exported, arch):
    """Tensors the release keeps (routers, score bias, A_log, dt_bias, conv1d, b/a projections, indexer weights_proj
    and k_norm, full-width q/k norms) come out in the dtype and with the bytes the source stores, whatever that is;
    the rest as ever."""
    assert exported.returncode == 0, exported.log()
    src, out = read_output(exported.src), read_output(exported.out)
    assert mismatches(exported.out, src) == []
    d = dims_from_hf(tiny_hf_config(arch))
    kept = [n for n in as_stored_tensors(rules_for(d), d) if out[n].dtype != torch.float8_e4m3fn]
    assert any(src[n].dtype == torch.float32 for n in kept) and any(src[n].dtype == torch.bfloat16 for n in kept)
    for n in kept:
        assert out[n].dtype == src[n].dtype and torch.equal(out[n].view(torch.uint8), src[n].view(torch.uint8)), n
    assert all(t.dtype == torch.bfloat16 for n, t in out.items() if n not in set(kept) and t.dtype.is_floating_point
               and t.dtype != torch.float8_e4m3fn and not n.endswith("_scale_inv"))


CLASSES = {"deepseek_v32": "DeepseekV32ForCausalLM", "glm_moe_dsa": "GlmMoeDsaForCausalLM",
           "qwen3_next": "Qwen3NextForCausalLM", "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
           "minimax_m2": "MiniMaxM2ForCausalLM"}


@pytest.mark.parametrize("arch", FAMILIES)
def test_transformers_loads(exported, arch):
    """transformers builds the family's own class from the output with every tensor used and none missing, and the
    logits of the dequantized checkpoint follow the source's."""
    assert exported.returncode == 0, exported.log()
    out, state = exported.out, exported.state
    assert mismatches(out, state) == []
    assert sum(t.dtype == torch.float8_e4m3fn for t in read_output(out).values()) >= 10
    model, info = tf.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, device_map="cpu",
                                                          output_loading_info=True)
    assert type(model).__name__ == CLASSES[arch]
    assert not any(info.values()), info
    report = verify_checkpoint(out, source=exported.src, logits=True)
    print(f"{arch}: logits vs source {report.logits}")
    assert report.ok, report.table()
    assert report.logits["rel_err"] < 0.1, report.logits
