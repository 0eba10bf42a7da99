"""Architecture units without processes: HF names exactly as transformers builds each model, layer selectors (dense
layers below MoE ones), MLA pieces, the module-partitioning check, replicated quantized pieces, the float32 expert
bias, layout arithmetic, registry lookups used by verify and serve-check."""
import pytest
import torch
import transformers as tf

from megatron_fp8pb import archs
from megatron_fp8pb.archs import dims_from_hf, rules_for
from megatron_fp8pb.config import QuantConfig
from megatron_fp8pb.plan.params import Layout, PlanContext, expected_tensors, plan_param
from megatron_fp8pb.sources.presets import PRESETS, preset_hf_config
from megatron_fp8pb.sources.tiny import random_hf_state, tiny_hf_config
from megatron_fp8pb.plan.validate import check_layout


def _transformers_names(cfg) -> set[str]:
    """State dict names of the transformers model, with fused experts spelled per expert as checkpoints save them."""
    auto = tf.AutoModelForImageTextToText if getattr(cfg, "vision_config", None) else tf.AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(cfg)
    names = set()
    for n, t in model.state_dict().items():
        if n.endswith("experts.gate_up_proj"):
            block = n[:-len("gate_up_proj")]
            leaves = ("w1", "w3") if cfg.model_type in ("mixtral", "minimax_m2") else ("gate_proj", "up_proj")
            names |= {f"{block}{e}.{leaf}.weight" for e in range(t.shape[0]) for leaf in leaves}
        elif n.endswith("experts.down_proj"):
            block = n[:-len("down_proj")]
            leaf = "w2" if cfg.model_type in ("mixtral", "minimax_m2") else "down_proj"
            names |= {f"{block}{e}.{leaf}.weight" for e in range(t.shape[0])}
        else:
            names.add(n)
    if cfg.model_type in ("mixtral", "minimax_m2"):   # transformers renames Mixtral's checkpoint block_sparse_moe to mlp at load
        names = {n.replace(".mlp.", ".block_sparse_moe.") for n in names}
    if getattr(cfg, "tie_word_embeddings", False):
        names.discard("lm_head.weight")
    return names


@pytest.mark.parametrize("arch", archs.supported())
def test_hf_names_are_transformers_names(arch):
    cfg = tiny_hf_config(arch)
    d = dims_from_hf(cfg)
    assert set(expected_tensors(rules_for(d), d)) == _transformers_names(cfg)


def test_deepseek_v3_dims_and_selectors():
    d = dims_from_hf(tiny_hf_config("deepseek_v3"))
    assert (d.mla, d.q_lora_rank, d.kv_lora_rank, d.qk_rope_dim, d.dense_layers, d.moe_layers) == \
        (True, 0, 192, 64, (0,), (1,))
    names = expected_tensors(rules_for(d), d)
    assert names["model.layers.0.mlp.down_proj.weight"] == (384, 1152)
    assert names["model.layers.1.mlp.gate.e_score_correction_bias"] == (4,)
    assert names["model.layers.1.mlp.shared_experts.up_proj.weight"] == (384, 384)
    assert names["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (256, 384)
    assert not any(n.startswith("model.layers.1.mlp.down_proj") or n.startswith("model.layers.0.mlp.experts")
                   for n in names)
    assert random_hf_state(tiny_hf_config("deepseek_v3"))["model.layers.1.mlp.gate.e_score_correction_bias"].dtype \
        == torch.float32


def _ds(**kw):
    cfg = tiny_hf_config("deepseek_v3")
    for k, v in kw.items():
        setattr(cfg, k, v)
    d = dims_from_hf(cfg)
    return d


def test_mla_pieces_and_dense_layer_refuses_moe_names():
    d = _ds(q_lora_rank=96, kv_lora_rank=128)    # kv_a_proj_with_mqa 192 rows, 96 per rank at tp 2
    layout = Layout(tp_size=2, tp_rank=1)
    plan = plan_param("decoder.layers.0.self_attention.linear_kv_down_proj.weight", (96, 384),
                      PlanContext.make(d, layout, QuantConfig(), {0: 0, 1: 1}, 0))
    (p,) = plan.pieces
    assert (p.hf_name, p.offset, p.length, p.quantize, p.axis) == \
        ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", 96, 96, True, "tp")
    plan = plan_param("decoder.layers.1.self_attention.linear_q_down_proj.weight", (48, 384),
                      PlanContext.make(d, layout, QuantConfig(), {0: 0, 1: 1}, 2))
    assert plan.pieces[0].hf_name == "model.layers.1.self_attn.q_a_proj.weight"
    with pytest.raises(ValueError, match="decoder.layers.0.mlp.router.weight.*matches no rule"):
        plan_param("decoder.layers.0.mlp.router.weight", (4, 384),
                   PlanContext.make(d, layout, QuantConfig(), {0: 0}, 2))
    with pytest.raises(ValueError, match="decoder.layers.1.mlp.linear_fc1.weight.*matches no rule"):
        plan_param("decoder.layers.1.mlp.linear_fc1.weight", (1152, 384),
                   PlanContext.make(d, layout, QuantConfig(), {1: 1}, 2))


def test_expert_bias_is_float32_and_written_once():
    d = _ds()
    for rank in (0, 1):
        plan = plan_param("decoder.layers.1.mlp.router.expert_bias", (4,),
                          PlanContext.make(d, Layout(tp_size=2, tp_rank=rank), QuantConfig(), {1: 1}, 4))
        assert [(p.hf_name, p.dtype, p.quantize) for p in plan.pieces] == \
            ([("model.layers.1.mlp.gate.e_score_correction_bias", "float32", False)] if rank == 0 else [])


def test_replicated_quantized_piece_is_quantized_whole():
    """A down-projection that TransformerEngine builds replicated (TELinear, duplicated): full rows on every tp rank,
    written by tp rank 0 alone, quantized there with no amax all-reduce (axis None)."""
    d = _ds(kv_lora_rank=128)
    pieces = []
    for rank in (0, 1):
        plan = plan_param("decoder.layers.0.self_attention.linear_kv_down_proj.weight", (192, 384),
                          PlanContext.make(d, Layout(tp_size=2, tp_rank=rank), QuantConfig(), {0: 0}),
                          style="replicated")
        pieces += plan.pieces
    (p,) = pieces
    assert (p.offset, p.length, p.quantize, p.axis) == (0, 192, True, None)


def test_module_partitioning_that_disagrees_with_the_table_is_refused():
    d = _ds()
    with pytest.raises(ValueError, match=r"linear_kv_up_proj.weight' is rowwise .*self_attn.kv_b_proj.weight as colwise"):
        plan_param("decoder.layers.0.self_attention.linear_kv_up_proj.weight", (256, 192),
                   PlanContext.make(d, Layout(tp_size=2), QuantConfig(), {0: 0}, 0), style="rowwise")
    with pytest.raises(ValueError, match=r"linear_proj.weight' is replicated .*self_attn.o_proj.weight as rowwise"):
        plan_param("decoder.layers.0.self_attention.linear_proj.weight", (384, 128),
                   PlanContext.make(d, Layout(tp_size=2), QuantConfig(), {0: 0}, 0), style="replicated")


@pytest.mark.parametrize("kw,tp,pp,ep,etp,world,msg", [
    (dict(num_attention_heads=6), 4, 1, 1, 1, 4, r"num_attention_heads\(6\) % tp\(4\) = 2 != 0 \(multi-latent"),
    (dict(intermediate_size=1000), 16, 1, 1, 1, 16, r"intermediate_size\(1000\) % tp\(16\) = 8 != 0 \(dense layers"),
    (dict(moe_intermediate_size=100), 1, 1, 1, 8, 8, r"moe_intermediate_size\(100\) % etp\(8\) = 4 != 0"),
    (dict(n_routed_experts=6), 1, 1, 4, 1, 4, r"num_experts\(6\) % ep\(4\) = 2 != 0"),
    (dict(num_hidden_layers=3), 1, 2, 1, 1, 2, r"num_hidden_layers\(3\) % pp\(2\) = 1 != 0 \(1 dense \+ 2 MoE"),
])
def test_layout_arithmetic(kw, tp, pp, ep, etp, world, msg):
    cfg = tiny_hf_config("deepseek_v3")
    for k, v in kw.items():
        setattr(cfg, k, v)
    with pytest.raises(ValueError, match=msg):
        check_layout(dims_from_hf(cfg), world, tp, pp, ep, etp)


def test_registry_tables_for_verify_and_serving():
    styles = archs.serving_styles()
    assert styles["kv_a_proj_with_mqa"] == styles["q_a_proj"] == "replicated"
    assert styles["kv_b_proj"] == styles["q_b_proj"] == "column" and styles["w2"] == "row"
    assert ("q_a_proj", "kv_a_proj_with_mqa") in archs.fusion_groups()
    assert {"gate", "shared_expert_gate"} <= set(archs.never_quantized_leaves())
    assert archs.default_exclude(dims_from_hf(tiny_hf_config("deepseek_v3"))) == \
        ("model.embed_tokens", "lm_head", "*.shared_head.head", "*norm*", "*.mlp.gate")
    with pytest.raises(ValueError, match="'gpt2' is not supported; supported model_type values: llama"):
        archs.arch("gpt2")


@pytest.mark.parametrize("name", ["deepseek-v3", "kimi-k2"])
def test_deepseek_presets(name):
    d = dims_from_hf(preset_hf_config(name, 4))
    assert PRESETS[name] == "deepseek_v3" and d.num_layers == 4
    assert (d.kv_lora_rank + d.qk_rope_dim, d.q_lora_rank) == (576, 1536)
    assert d.num_experts == (256 if name == "deepseek-v3" else 384)
    check_layout(d, 8, 8, 1, 8, 1)
