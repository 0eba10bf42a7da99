"""The boxes a dense GPT's parameter is read from (``sources/megatron_plain``) and its two ways of reading them: in
place with positioned reads, and through torch.distributed.checkpoint's reader (chunks that cannot be located)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_fp8pb.archs.base import COLWISE, GATED, REPLICATED, ROWWISE, Rule
from megatron_fp8pb.plan.params import Layout
from megatron_fp8pb.sources import megatron_plain as mp
from megatron_fp8pb.sources.distcp import DirectReads
from megatron_fp8pb.sources.distcp_layout import saved_index
from megatron_fp8pb.sources.streamed import LocalParam


def _rule(shard: str, fusion: str = "plain") -> Rule:
    return Rule(("x",), ("x",), lambda d: ((1, 1),), shard, fusion)


@pytest.fixture
def saved(tmp_path):
    """Two stacked layers of a gated fc1 (2 x [gate 6; up 6] rows x 5), a row-parallel weight and a norm."""
    g = torch.Generator().manual_seed(1)
    state = {"decoder.layers.mlp.linear_fc1.weight": torch.randn(2, 12, 5, generator=g).to(torch.bfloat16),
             "decoder.layers.mlp.linear_fc2.weight": torch.randn(2, 5, 6, generator=g).to(torch.bfloat16),
             "decoder.layers.1.input_layernorm.weight": torch.randn(5, generator=g).to(torch.bfloat16)}
    dcp.save(state, checkpoint_id=str(tmp_path), no_dist=True)
    return tmp_path, state


def _read(path, key, p, stacked, layout, via_torch, monkeypatch):
    index = saved_index(path)
    boxes, full = mp.regions(p, key, stacked, layout, num_layers=2)
    assert full == index.shapes[key]
    items = [it for b in boxes for it in mp.items_of(b, index, str(path), p.name)]
    if via_torch:       # as for a chunk that cannot be located in place
        monkeypatch.setattr(mp, "read_items", lambda *a: False)
    else:
        monkeypatch.setattr(mp, "_read_with_torch", lambda *a: pytest.fail("not read in place"))
    return mp._read(str(path), p, items, mp._Storage(index, str(path)), DirectReads(str(path)), torch.bfloat16)


@pytest.mark.parametrize("via_torch", [False, True])
def test_each_rank_reads_megatrons_slices(saved, via_torch, monkeypatch):
    path, state = saved
    fc1, fc2 = state["decoder.layers.mlp.linear_fc1.weight"], state["decoder.layers.mlp.linear_fc2.weight"]
    for r in range(3):      # tp=3: rank r holds gate rows [2r, 2r+2) and up rows [6+2r, 6+2r+2) of layer 1
        layout = Layout(tp_size=3, tp_rank=r)
        got = _read(path, "decoder.layers.mlp.linear_fc1.weight", LocalParam("fc1", (4, 5), _rule(COLWISE, GATED),
                    0, 1), True, layout, via_torch, monkeypatch)
        assert torch.equal(got, torch.cat([fc1[1, 2 * r:2 * r + 2], fc1[1, 6 + 2 * r:8 + 2 * r]]))
        got = _read(path, "decoder.layers.mlp.linear_fc2.weight", LocalParam("fc2", (5, 2), _rule(ROWWISE), 0, 0),
                    True, layout, via_torch, monkeypatch)
        assert torch.equal(got, fc2[0, :, 2 * r:2 * r + 2])
    got = _read(path, "decoder.layers.1.input_layernorm.weight", LocalParam("norm", (5,), _rule(REPLICATED), 0, 1),
                False, Layout(tp_size=3, tp_rank=2), via_torch, monkeypatch)
    assert torch.equal(got, state["decoder.layers.1.input_layernorm.weight"])


def test_a_region_the_chunks_do_not_cover_names_the_key(saved):
    path, _ = saved
    index = saved_index(path)
    region = mp.Region("decoder.layers.mlp.linear_fc2.weight", (1, 0, 0), (2, 5, 6), 0)    # past the last layer
    with pytest.raises(ValueError, match=r"the saved chunks of 'decoder.layers.mlp.linear_fc2.weight' cover 30 of "
                                         r"the 60 elements .* \(parameter fc2\); the checkpoint is incomplete"):
        mp.items_of(region, index, str(path), "fc2")
