"""The full-width q/k norm's split along heads (``qk_norm_local.head_layout``), and MiniMax-M2's partial rotary read
from the released config.json's ``rotary_dim`` as transformers reads it."""
import pytest

from megatron_fp8pb.parallel.qk_norm_local import head_layout


@pytest.mark.parametrize("which,heads,kv,tp,want", [("query", 48, 8, 8, (6, 8, 1)), ("key", 48, 8, 8, (1, 8, 1)),
                                                     ("key", 48, 8, 16, (1, 8, 2)), ("query", 48, 8, 16, (3, 16, 1)),
                                                     ("key", 4, 2, 1, (2, 1, 1)), ("key", 4, 1, 2, (1, 1, 2))])
def test_head_layout(which, heads, kv, tp, want):
    assert head_layout(which, heads, kv, tp) == want


@pytest.mark.parametrize("which,heads,kv,tp,says", [("query", 6, 2, 4, "num_attention_heads(6) % tp(4) = 2 != 0"),
                                                     ("key", 8, 3, 4, "tp(4) % num_query_groups(3) = 1 != 0"),
                                                     ("key", 12, 6, 4, "num_query_groups(6) % tp(4) = 2 != 0")])
def test_head_layout_refuses_with_the_arithmetic(which, heads, kv, tp, says):
    with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
        head_layout(which, heads, kv, tp)


def test_rotary_dim_of_the_released_config():
    import transformers as tf

    from megatron_fp8pb.archs import dims_from_hf
    from megatron_fp8pb.sources.hf_config import reads_like_transformers
    raw = dict(model_type="minimax_m2", hidden_size=3072, num_hidden_layers=62, num_attention_heads=48,
               num_key_value_heads=8, head_dim=128, rotary_dim=64, rope_theta=5e6, num_local_experts=256,
               num_experts_per_tok=8, intermediate_size=1536, vocab_size=200064, use_qk_norm=True,
               qk_norm_type="per_layer", max_position_embeddings=196608, tie_word_embeddings=False)
    view = reads_like_transformers(dict(raw))
    assert view is not None and dims_from_hf(view).partial_rotary == 0.5
    cls = tf.MiniMaxM2Config(**{k: v for k, v in raw.items() if k != "model_type"})
    assert dims_from_hf(cls) == dims_from_hf(view)


@pytest.mark.parametrize("style", ["replicated", "head-replicated"])
def test_a_norm_not_split_along_tp_is_refused_by_name(style):
    """A full-width norm module that says its weight is whole on every rank (another project's module without
    ``tensor_model_parallel``), or whose kv heads several ranks hold, is refused at plan time, naming the parameter."""
    from megatron_fp8pb.archs import dims_from_hf
    from megatron_fp8pb.plan.params import Layout, PlanContext, plan_param
    from megatron_fp8pb.sources.tiny import tiny_hf_config
    d = dims_from_hf(tiny_hf_config("minimax_m2"))
    ctx = PlanContext.make(d, Layout(tp_size=2, tp_rank=1), layer_of_local={0: 0})
    name = "decoder.layers.0.self_attention.k_layernorm.weight"
    assert plan_param(name, (80,), ctx, style="colwise").slices[0].offset == 80
    with pytest.raises(ValueError, match=f"'{name}' is {style}.*k_norm.weight as colwise"):
        plan_param(name, (80,), ctx, style=style)
