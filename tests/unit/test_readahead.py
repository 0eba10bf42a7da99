"""The source readahead: which tensors a stage reads and in what order, the window it keeps, and that the reader's
bytes are the same with it."""
from __future__ import annotations

import os
import time

import pytest
import torch
from safetensors.torch import save_file

from megatron_fp8pb.sources import readahead
from megatron_fp8pb.sources.hf import HFReader
from megatron_fp8pb.sources.readahead import Readahead, stage_order
from megatron_fp8pb.sources.safetensors_layout import byte_ranges

NAMES = ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"] + [
    f"model.layers.{i}.{p}" for i in (0, 1, 2, 3, 10) for p in ("mlp.down_proj.weight", "input_layernorm.weight")]


def test_stage_order_follows_units_and_stages():
    one = stage_order(NAMES, num_layers=4, pp=1, pp_rank=0)
    assert one[:1] == ["model.embed_tokens.weight"]
    assert [n.split(".")[2] for n in one[1:3]] == ["0", "0"]        # the export's unit order: the first layer,
    assert set(one[3:5]) == {"lm_head.weight", "model.norm.weight"}     # then lm_head, then the other layers
    layers = [int(n.split(".")[2]) for n in one if ".layers." in n]
    assert layers == sorted(layers) and set(layers) == {0, 1, 2, 3, 10}     # layer 10: an MTP layer (>= 4)
    assert one[5:] == [n for n in one if ".layers." in n][2:]
    first, last = stage_order(NAMES, 4, 2, 0), stage_order(NAMES, 4, 2, 1)
    assert first == ["model.embed_tokens.weight"] + [f"model.layers.{i}.{p}" for i in (0, 1)
                                                     for p in ("input_layernorm.weight", "mlp.down_proj.weight")]
    assert "model.embed_tokens.weight" not in last and "lm_head.weight" in last
    assert {int(n.split(".")[2]) for n in last if ".layers." in n} == {2, 3, 10}
    tied = [n for n in NAMES if n != "lm_head.weight"]
    assert stage_order(tied, 4, 2, 1)[:2] == ["model.embed_tokens.weight", "model.norm.weight"]


def _checkpoint(path, n=6, rows=300, cols=257):
    g = torch.Generator().manual_seed(3)
    tensors = {f"model.layers.{i}.w.weight": torch.randn(rows, cols, generator=g).to(torch.bfloat16)
               for i in range(n)}
    save_file(tensors, str(path / "model.safetensors"))
    return tensors


def test_stage_order_keeps_the_experts_of_its_expert_parallel_rank():
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.{i}.mlp.experts.{e}.{p}.weight" for i in (0, 1) for e in range(4)
        for p in ("gate_proj", "down_proj")]
    names += [f"model.layers.{i}.mlp.shared_experts.up_proj.weight" for i in (0, 1, 2)]
    names += [f"model.layers.2.mlp.experts.{e}.up_proj.weight" for e in range(6)]   # an MTP layer, 6 experts
    assert len(stage_order(names, 2, 1, 0)) == len(names)

    def experts(ep, ep_rank):
        mine = stage_order(names, 2, 1, 0, ep=ep, ep_rank=ep_rank)
        assert all(n in mine for n in names if ".experts." not in n)     # dense and shared experts: every rank
        got = {}
        for n in mine:
            if ".experts." in n:
                got.setdefault(int(n.split(".")[2]), set()).add(int(n.split(".")[5]))
        return got
    assert experts(2, 0) == {0: {0, 1}, 1: {0, 1}, 2: {0, 1, 2}}
    assert experts(2, 1) == {0: {2, 3}, 1: {2, 3}, 2: {3, 4, 5}}
    assert experts(4, 3) == {0: {3}, 1: {3}, 2: set(range(6))}     # 6 experts over 4 ranks: not split, all read


def test_window_bounds_reads_ahead_of_the_reader(tmp_path):
    _checkpoint(tmp_path)
    where = byte_ranges(tmp_path)
    order = stage_order(list(where), 6, 1, 0)
    ranges = [(n,) + where[n] for n in order]
    size = ranges[0][3]
    ra = Readahead(ranges, window=size, threads=2, chunk=4096)
    try:
        deadline = time.time() + 10

        def settle(want):
            while ra.bytes_read < want and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
            return ra.bytes_read

        # the reader at tensor 0: at most one window (one tensor) ahead, plus the reads already in flight
        assert size <= settle(size) <= size + 2 * 4096
        ra.consumed(order[3])
        assert 4 * size <= settle(4 * size) <= 4 * size + 2 * 4096
        ra.consumed(order[5])
        assert settle(ra.total) == ra.total == 6 * size
    finally:
        ra.close()


def test_reader_bytes_identical_with_readahead(tmp_path):
    tensors = _checkpoint(tmp_path)
    ra = readahead.start(tmp_path, num_layers=6)
    try:
        reader = HFReader(tmp_path, ra)
        for name, t in tensors.items():
            assert torch.equal(reader.read(name), t)
            assert torch.equal(reader.read(name, dim=1, offset=128, length=129), t[:, 128:])
            assert torch.equal(reader.read(name, dim=0, offset=7, length=100), t[7:107])
        reader.close()
        assert readahead._ACTIVE == {} and ra.bytes_read == ra.total
    finally:
        readahead.stop(tmp_path)


def test_command_line_start_ignores_other_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert readahead.start_for_command_line(None, ["source.kind=tiny"]) is None
    assert readahead.start_for_command_line(None, ["source.kind=hf", f"source.path={tmp_path}",
                                                   "source.readahead=false"]) is None
    assert readahead.start_for_command_line(None, ["source.kind=hf", f"source.path={tmp_path}/none"]) is None
    _checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 6}')
    os.environ.pop("RANK", None)
    ra = readahead.start_for_command_line(None, ["source.kind=hf", f"source.path={tmp_path}"])
    try:
        assert ra is not None and ra.total == sum(r[2] for r in byte_ranges(tmp_path).values())
    finally:
        readahead.stop(tmp_path)


def test_window_respects_a_cgroup_memory_limit(tmp_path):
    (tmp_path / "memory.max").write_text("3000000000\n")
    (tmp_path / "memory.current").write_text("1000000000\n")
    assert readahead.mem_available(str(tmp_path)) <= 2_000_000_000
    (tmp_path / "memory.max").write_text("max\n")
    unlimited, no_cgroup = readahead.mem_available(str(tmp_path)), readahead.mem_available(str(tmp_path / "none"))
    assert abs(unlimited - no_cgroup) < 256 << 20      # both /proc/meminfo, read at two moments


def test_command_line_start_reads_a_megatron_checkpoint_whole_where_its_metadata_is_unreadable(tmp_path,
                                                                                               monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    (tmp_path / "ck").mkdir()
    sizes = {"__1_0.distcp": 5 << 20, "__0_0.distcp": 3 << 20 | 7, ".metadata": 100}
    for name, n in sizes.items():
        (tmp_path / "ck" / name).write_bytes(os.urandom(n))
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 2}')
    ra = readahead.start_for_command_line(None, ["source.kind=megatron", f"source.path={tmp_path}/ck",
                                                 f"source.hf_config={tmp_path}/config.json"])
    try:
        assert ra is not None and ra.total == (5 << 20) + (3 << 20 | 7)
        assert [c[0].name for c in ra._chunks[:1]] == ["__0_0.distcp"]      # data files in name order
        deadline = time.time() + 10
        while ra.bytes_read < ra.total and time.time() < deadline:
            time.sleep(0.01)
        assert ra.bytes_read == ra.total
    finally:
        readahead.stop(tmp_path / "ck")
    assert readahead.start_for_command_line(None, ["source.kind=megatron", f"source.path={tmp_path}/ck",
                                                   f"source.hf_config={tmp_path}/config.json",
                                                   "source.readahead=false"]) is None


def test_a_source_without_safetensors_says_what_it_holds_and_what_to_do(tmp_path):
    from megatron_fp8pb.sources.safetensors_layout import tensor_files
    with pytest.raises(FileNotFoundError, match=r"holds no model.safetensors or model.safetensors.index.json; point "
                                                r"source.path at an HF checkpoint directory"):
        tensor_files(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"holds \['pytorch_model.bin'\] but no model.safetensors or "
                                                r"model.safetensors.index.json, which the export reads: save the model "
                                                r"with transformers' save_pretrained \(safetensors\)"):
        tensor_files(tmp_path)
