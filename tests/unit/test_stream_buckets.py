"""Buckets of the stream keep every pair once and in order within their byte bound (a larger tensor alone); the
one-sync finiteness check of loaded parameters finds NaN and Inf and lets the plan name the HF tensor."""
import pytest
import torch
import transformers as tf

from megatron_fp8pb.archs import dims_from_hf
from megatron_fp8pb.exporter.options import RankView
from megatron_fp8pb.exporter.pipeline import make_plans
from megatron_fp8pb.plan.params import PlanContext
from megatron_fp8pb.plan.ranks import rank_layout
from megatron_fp8pb.plan.tp_slices import finite_flags
from megatron_fp8pb.sources.streamed import local_param_shapes, stage_layers
from megatron_fp8pb.stream.buckets import bucketed, tensor_bytes


def _pairs(sizes):
    return [(f"t{k}", torch.zeros(n, dtype=torch.uint8)) for k, n in enumerate(sizes)]


@pytest.mark.parametrize("bound", [1, 7, 10, 25, 1000])
def test_buckets_keep_order_and_bound(bound):
    pairs = _pairs([3, 4, 10, 1, 1, 30, 2, 5, 5])
    buckets = list(bucketed(iter(pairs), bound))
    assert [n for b in buckets for n, _ in b] == [n for n, _ in pairs]
    for b in buckets:
        size = sum(tensor_bytes(t) for _, t in b)
        assert size <= bound or len(b) == 1, (bound, [n for n, _ in b])
    # greedy: a bucket closes only when the next pair would not fit
    for b, nxt in zip(buckets, buckets[1:]):
        assert sum(tensor_bytes(t) for _, t in b) + tensor_bytes(nxt[0][1]) > bound


def test_buckets_refuse_a_nonpositive_bound():
    with pytest.raises(ValueError, match="bucket_bytes=0"):
        list(bucketed(iter(_pairs([1])), 0))


def test_finite_flags():
    a = torch.randn(5, 7).bfloat16()
    nan, inf = a.clone(), a.clone()
    nan[2, 3] = float("nan")
    inf[4, 6] = float("-inf")
    assert finite_flags([a, nan, inf, torch.empty(0, 3), torch.arange(4), a.float()]) == \
        [True, False, False, True, True, True]


def test_plan_of_loaded_params_names_the_nan():
    hfc = tf.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    d, layout = dims_from_hf(hfc), rank_layout(0, 1, 1, 1)
    params = [(n, torch.randn(s).bfloat16()) for n, s in local_param_shapes(d, layout)]
    ctx = PlanContext.make(d, layout, layer_of_local=stage_layers(d, layout))
    assert len(make_plans(RankView(params, stage_layers(d, layout)), ctx)) == len(params)
    name, p = next((n, p) for n, p in params if n.endswith("1.mlp.linear_fc2.weight"))
    p[5, 9] = float("inf")
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.down_proj.weight' \[128, 256\] holds inf at index "
                                         r"\[5, 9\]"):
        make_plans(RankView(params, stage_layers(d, layout)), ctx)
