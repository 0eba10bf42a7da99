"""quant.scale_fmt end to end through the options: config key validated by name, QuantConfig, every quantized piece
of the plan carrying it, quantization_config writing the key only in ue8m0 mode."""
import pytest

from megatron_fp8pb.archs import dims_from_hf
from megatron_fp8pb.config import load_config
from megatron_fp8pb.output.hf_files import quantization_config
from megatron_fp8pb.config import QuantConfig
from megatron_fp8pb.plan.params import Layout, PlanContext, plan_param
from megatron_fp8pb.sources.tiny import tiny_hf_config


def test_config_key_default_and_choices():
    assert load_config().quant.scale_fmt == "amax"
    assert load_config(None, ["quant.scale_fmt=ue8m0"]).quant.scale_fmt == "ue8m0"
    with pytest.raises(ValueError, match=r"quant\.scale_fmt='e8m0'.*amax, ue8m0"):
        load_config(None, ["quant.scale_fmt=e8m0"])


def test_quant_choice_validates():
    assert QuantConfig().scale_fmt == "amax"
    with pytest.raises(ValueError, match=r"quant\.scale_fmt='pow2'.*amax, ue8m0"):
        QuantConfig(scale_fmt="pow2")


def test_quantization_config_key_only_in_ue8m0():
    assert "scale_fmt" not in quantization_config(["lm_head"], True)
    assert "scale_fmt" not in quantization_config(["lm_head"], True, "amax")
    assert quantization_config(["lm_head"], True, "ue8m0")["scale_fmt"] == "ue8m0"
    assert quantization_config([], False, "ue8m0") is None


@pytest.mark.parametrize("fmt", ["amax", "ue8m0"])
def test_plan_pieces_carry_the_scale_format(fmt):
    cfg = tiny_hf_config("llama")
    d = dims_from_hf(cfg)
    ctx = PlanContext.make(d, Layout(tp_size=2), QuantConfig(scale_fmt=fmt), {0: 0})
    qkv = plan_param("decoder.layers.0.self_attention.linear_qkv.weight",
                     ((d.num_heads + 2 * d.num_query_groups) * d.head_dim // 2, d.hidden), ctx)
    norm = plan_param("decoder.final_layernorm.weight", (d.hidden,), ctx)
    assert qkv.pieces and all(p.quantize and p.scale_fmt == fmt for p in qkv.pieces)
    assert all(not p.quantize and p.scale_fmt == "amax" for p in norm.pieces)
