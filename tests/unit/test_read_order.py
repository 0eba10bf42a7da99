"""Reading a source as its bytes lie: the plan (ascending offsets within each file, a few files at a time), the
readahead on it, and the export's reader, whose reads of a save_pretrained-style source (tensors sorted by name in
each file: ``layers.10`` before ``layers.2``) go by ascending offset in every file while it hands on the same bytes
as the unit-by-unit reader."""
from __future__ import annotations

from itertools import groupby
from pathlib import Path

import pytest
import torch
import transformers as tf

from helpers import RAGGED, rewrite_as_save_pretrained, rewrite_in_export_order, write_hf_source
from megatron_fp8pb.archs import dims_from_hf
from megatron_fp8pb.config import QuantConfig
from megatron_fp8pb.exporter.options import RankView
from megatron_fp8pb.exporter.pipeline import local_pieces, make_plans
from megatron_fp8pb.plan.params import Layout, PlanContext
from megatron_fp8pb.plan.write_order import streamed_unit_order
from megatron_fp8pb.sources.hf import HFReader
from megatron_fp8pb.sources.layout_reader import LayoutReader, reads_by_layout
from megatron_fp8pb.sources.read_plan import schedule, unit_order
from megatron_fp8pb.sources.readahead import Readahead
from megatron_fp8pb.sources.registry import layout_unit_order
from megatron_fp8pb.sources.streamed import Prefetch, hf_params, materialize, stage_layers

LAYERS = 12     # layers.10 and layers.11 sort before layers.2


def ascending_per_file(reads) -> dict:
    """File -> the offsets read from it, in the order read."""
    out: dict = {}
    for f, at in reads:
        out.setdefault(Path(f), []).append(at)
    return out


def test_schedule_reads_files_in_order_a_few_at_a_time():
    a, b, c = Path("m-1"), Path("m-2"), Path("m-3")
    ranges = [("x", a, 500, 100), ("y", a, 100, 100), ("z", b, 0, 50), ("w", c, 10, 10), ("v", b, 60, 50)]
    got = schedule(ranges, files_at_once=2)
    assert [r.name for r in got] == ["y", "z", "v", "x", "w"]     # a and b at once; c where b's lane frees
    assert [(r.start, r.end) for r in got] == [(0, 100), (0, 50), (50, 100), (100, 200), (100, 110)]
    for offsets in ascending_per_file((r.file, r.first_byte) for r in got).values():
        assert offsets == sorted(offsets)
    one = schedule(ranges, files_at_once=1)
    assert [r.name for r in one] == ["y", "x", "z", "v", "w"]
    # units by when their last bytes arrive: unit 2 (z, v) at 100, unit 3 (w) at 110, unit 1 (y, x) at 200; unit 4
    # holds nothing and comes last
    units = {"y": 1, "x": 1, "z": 2, "v": 2, "w": 3}
    assert unit_order(ranges, units, [1, 2, 3, 4], files_at_once=2) == [2, 3, 1, 4]
    assert unit_order(ranges, units, [1, 2, 3, 4], files_at_once=1) == [1, 2, 3, 4]


def _source(tmp_path, layout: str, tie=False):
    cfg = tf.LlamaConfig(**{**RAGGED, "num_hidden_layers": LAYERS}, tie_word_embeddings=tie)
    src = tmp_path / layout
    state = write_hf_source(src, cfg, seed=5)
    (rewrite_as_save_pretrained if layout == "sorted" else rewrite_in_export_order)(src, cfg, 8 << 20)
    return src, state


def _pieces_by_unit(reader, src, layout: Layout):
    from megatron_fp8pb.sources.hf import hf_config
    d = dims_from_hf(hf_config(src))
    params = hf_params(reader, d, layout, torch.bfloat16)
    view = RankView(params, stage_layers(d, layout), 0)
    plans = make_plans(view, PlanContext.make(d, layout, QuantConfig(), view.layer_of_local, 0, False))
    mine = local_pieces(plans, d, 0)
    return d, {u: list(g) for u, g in groupby(mine, key=lambda pt: pt[0].order.unit)}


@pytest.mark.parametrize("tp_size,tp_rank", [(1, 0), (2, 1)])
def test_reads_ascend_in_every_file_of_a_name_sorted_source(tmp_path, tp_size, tp_rank):
    src, state = _source(tmp_path, "sorted")
    assert len(list(src.glob("*.safetensors"))) >= 3
    layout = Layout(tp_size=tp_size, tp_rank=tp_rank)
    reader = HFReader(src)
    reader.trace = []
    d, units = _pieces_by_unit(reader, src, layout)
    assert reads_by_layout(units)
    order = layout_unit_order(str(src), d)
    assert sorted(order) == sorted(streamed_unit_order(d)) and order != streamed_unit_order(d)
    assert order.index(1 + 10) < order.index(1 + 8)     # in the last file layers.10's bytes lie before layers.8's
    got = {}
    pre = LayoutReader(order, units)
    seen = []
    for u, items, error in pre:
        assert error is None
        seen.append(u)
        got[u] = items
        pre.release()
    pre.close()
    assert seen == order
    offsets = ascending_per_file(reader.trace)
    assert len(offsets) >= 3
    for f, at in offsets.items():
        assert at == sorted(at), f"{f.name}: reads out of the file's order {at}"
    assert ascending_per_file(pre.reads) == offsets
    # the same bytes as the unit-by-unit reader, piece for piece
    plain = HFReader(src)
    plain.trace = []
    _, units2 = _pieces_by_unit(plain, src, layout)
    wants = {u: materialize(units2.get(u, []), 0) for u in streamed_unit_order(d)}   # read in the export's order
    assert any(at != sorted(at) for at in ascending_per_file(plain.trace).values())     # which jumps back
    for u in order:
        want = wants[u]
        assert [p for p, _ in got[u]] == [p for p, _ in want]
        for (_, x), (_, y) in zip(got[u], want):
            assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8))
    reader.close()
    plain.close()


def test_order_of_an_export_ordered_source_is_the_unit_order(tmp_path):
    """Files in unit order: read one at a time, the units come in order; two at a time, the units of each file do."""
    from megatron_fp8pb.archs import rules_for
    from megatron_fp8pb.plan.params import hf_units
    from megatron_fp8pb.sources.hf import hf_config
    from megatron_fp8pb.sources.safetensors_layout import byte_ranges
    src, _ = _source(tmp_path, "export-ordered")
    d = dims_from_hf(hf_config(src))
    where, units = byte_ranges(src), hf_units(rules_for(d), d)
    ranges = [(n,) + r for n, r in where.items()]
    assert unit_order(ranges, units, streamed_unit_order(d), files_at_once=1) == sorted(streamed_unit_order(d))
    order = layout_unit_order(str(src), d)
    for f in {r[0] for r in where.values()}:    # the units wholly in one file keep their order
        held = {u for n, u in units.items() if n in where and where[n][0] == f}
        whole = [u for u in order if u in held and all(where[n][0] == f for n, v in units.items() if v == u)]
        assert whole == sorted(whole)


def test_reading_goes_on_past_a_small_budget(tmp_path):
    """With room for less than one piece the reader still hands on every unit, whole and right."""
    src, state = _source(tmp_path, "sorted")
    reader = HFReader(src)
    d, units = _pieces_by_unit(reader, src, Layout())
    order = layout_unit_order(str(src), d)
    pre = LayoutReader(order, units, budget=1)
    n = 0
    for u, items, error in pre:
        assert error is None
        for p, x in items:
            assert torch.equal(x, state[p.hf_name])
            n += 1
        pre.release()
    pre.close()
    assert n == sum(len(v) for v in units.values())
    reader.close()


def test_memory_stays_within_the_budget_while_the_caller_works(tmp_path):
    """A slow caller: the reader holds at most its budget plus the unit the caller waits for."""
    import time
    src, _ = _source(tmp_path, "sorted")
    reader = HFReader(src)
    d, units = _pieces_by_unit(reader, src, Layout())
    pre = LayoutReader(layout_unit_order(str(src), d), units)
    largest = max(pre._unit_bytes.values())
    assert pre.budget == 2 * largest
    for _ in pre:
        time.sleep(0.02)
        pre.release()
    pre.close()
    assert largest < pre.peak_held <= pre.budget + largest < sum(pre._unit_bytes.values())
    reader.close()


def test_a_bad_piece_is_an_error_of_its_unit(tmp_path):
    src, _ = _source(tmp_path, "sorted")
    reader = HFReader(src)
    d, units = _pieces_by_unit(reader, src, Layout())
    order = layout_unit_order(str(src), d)
    bad = 1 + 3
    f, at = units[bad][0][1].param.reads.where(units[bad][0][1].plan, units[bad][0][1].index)
    with open(f, "r+b") as fh:          # a NaN (bf16 0x7fc0) at the first element of layer 3's first piece
        fh.seek(at)
        fh.write(b"\xc0\x7f")
    errors = {}
    pre = LayoutReader(order, units)
    for u, items, error in pre:
        if error:
            errors[u] = error
        pre.release()
    pre.close()
    assert list(errors) == [bad] and "nan at index" in errors[bad].lower(), errors
    reader.close()


def test_readahead_follows_the_plan(tmp_path):
    src, _ = _source(tmp_path, "sorted")
    from megatron_fp8pb.sources.safetensors_layout import byte_ranges
    where = byte_ranges(src)
    ra = Readahead(schedule([(n,) + r for n, r in where.items()]), window=1 << 40, threads=2, chunk=4096)
    try:
        chunks = [(f, at) for f, at, _, _ in ra._chunks]
        per_file = ascending_per_file(chunks)
        assert len(per_file) >= 3
        for at in per_file.values():
            assert at == sorted(at)
        first_two = {f for f, _ in chunks[:4]}
        assert len(first_two) == 2          # two files read at once, chunk by chunk
    finally:
        ra.close()


def test_prefetch_still_serves_sources_read_whole():
    """A source whose parameters are read whole (a Megatron checkpoint) keeps the unit-by-unit reader."""
    pre = Prefetch([0, 1, 2], lambda u: [u])
    assert [(u, items) for u, items, _ in _released(pre)] == [(0, [0]), (1, [1]), (2, [2])]


def _released(pre):
    for x in pre:
        yield x
        pre.release()
    pre.close()
