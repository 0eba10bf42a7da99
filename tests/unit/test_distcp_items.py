"""Positioned reads of a torch.distributed.checkpoint: every saved chunk located in its .distcp file reads back as
torch's own reader loads it; what cannot be located is refused (None), never misread."""
from __future__ import annotations

import io
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from megatron_fp8pb.sources.distcp import DirectReads, locate, read_items


def _saved(path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    state = {
        "w": torch.randn(301, 129, generator=g).to(torch.bfloat16),
        "b": torch.randn(77, generator=g),
        "cube": torch.randn(3, 40, 9, generator=g).to(torch.float16),
        "t": torch.randn(64, 48, generator=g).t(),       # saved from a transposed view
        "s": torch.tensor(3.5),
        "i": torch.arange(12, dtype=torch.int64).view(3, 4),
    }
    dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return state


def test_every_saved_chunk_reads_back_as_torch_loads_it(tmp_path):
    state = _saved(tmp_path)
    md = FileSystemReader(str(tmp_path)).read_metadata()
    direct = DirectReads(str(tmp_path))
    try:
        assert len(md.storage_data) == len(state)
        for index, info in md.storage_data.items():
            with open(tmp_path / info.relative_path, "rb") as f:
                f.seek(info.offset)
                want = torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
            saved = direct.chunk(info.relative_path, info.offset, info.length)
            if saved is None:      # only a layout positioned reads cannot serve may be refused
                assert not want.is_contiguous() or want.storage_offset() != 0, index.fqn
                continue
            assert saved.dtype == want.dtype and saved.shape == tuple(want.shape), index.fqn
            rows = want.shape[0] if want.dim() else 1
            got = direct.read_rows(saved, 0, rows)
            assert torch.equal(got, want), index.fqn
            if want.dim() and rows > 2:
                assert torch.equal(direct.read_rows(saved, 1, rows - 2), want[1:rows - 1]), index.fqn
            assert torch.equal(state[index.fqn].contiguous(), want)
    finally:
        direct.close()


def test_read_items_fills_the_regions_torch_would(tmp_path):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
    state = _saved(tmp_path)
    md = FileSystemReader(str(tmp_path)).read_metadata()
    w = state["w"]
    # two destination regions of "w": rows 10..209 of columns 3..130 and the last 5 rows whole
    regions = {(10, 3): torch.empty(200, 126, dtype=w.dtype), (296, 0): torch.empty(5, 129, dtype=w.dtype)}
    chunks = [ChunkStorageMetadata(offsets=torch.Size(o), sizes=r.shape) for o, r in regions.items()]
    items = create_read_items_for_chunk_list("w", md.state_dict_metadata["w"], chunks)
    keys = list(regions)

    def resolve(item):
        buf = regions[keys[item.dest_index.index]]
        for dim, (off, n) in enumerate(zip(item.dest_offsets, item.lengths)):
            buf = buf.narrow(dim, off, n)
        return buf
    direct = DirectReads(str(tmp_path))
    try:
        assert read_items(direct, md.storage_data, items, resolve)
    finally:
        direct.close()
    assert torch.equal(regions[(10, 3)], w[10:210, 3:129]) and torch.equal(regions[(296, 0)], w[296:])


def _saved_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _locate_in(f, data: bytes, offset: int, length: int):
    """``locate`` of bytes ``[offset, offset + length)`` of a file holding ``data``."""
    f.write_bytes(data)
    fd = os.open(f, os.O_RDONLY)
    try:
        return locate(fd, f.name, offset, length)
    finally:
        os.close(fd)


def test_what_is_not_a_plain_saved_tensor_is_not_located(tmp_path):
    f = tmp_path / "x.distcp"
    saved, junk = _saved_bytes({"not": "a tensor"}), os.urandom(1000)
    assert _locate_in(f, junk + saved + junk, 1000, len(saved)) is None        # a dict, not a tensor
    assert _locate_in(f, junk + saved + junk, 0, 1000) is None                 # not an archive at all
    view = _saved_bytes(torch.arange(100, dtype=torch.float32)[10:30])   # a view into a larger storage, from 10
    assert _locate_in(f, view, 0, len(view)) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_dtypes_are_located(tmp_path, dtype):
    t = torch.randn(33, 17).to(dtype)
    dcp.save({"x": t}, checkpoint_id=str(tmp_path), no_dist=True)
    md = FileSystemReader(str(tmp_path)).read_metadata()
    info = next(iter(md.storage_data.values()))
    direct = DirectReads(str(tmp_path))
    try:
        saved = direct.chunk(info.relative_path, info.offset, info.length)
        assert saved is not None and saved.dtype == dtype
        assert torch.equal(direct.read_rows(saved, 0, 33).view(torch.uint8), t.view(torch.uint8))
    finally:
        direct.close()


def test_views_torch_load_would_change_are_not_located(tmp_path):
    for t in (torch._neg_view(torch.arange(1.0, 5.0)), torch.randn(3, dtype=torch.complex64).conj()):
        saved = _saved_bytes(t)
        assert _locate_in(tmp_path / "x.distcp", saved, 0, len(saved)) is None


def test_a_read_beyond_its_saved_chunk_is_left_to_torch(tmp_path):
    """.metadata and the data disagreeing (a read item past the saved chunk's end) is not read from whatever bytes
    follow: read_items declines, and torch's reader names the mismatch."""
    from dataclasses import replace
    dcp.save({"a": torch.ones(10, 4)}, checkpoint_id=str(tmp_path), no_dist=True)
    md = FileSystemReader(str(tmp_path)).read_metadata()
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
    want = ChunkStorageMetadata(offsets=torch.Size([6, 0]), sizes=torch.Size([4, 4]))
    item = create_read_items_for_chunk_list("a", md.state_dict_metadata["a"], [want])[0]
    past = replace(item, storage_offsets=torch.Size([8, 0]))       # rows 8..11 of a 10-row chunk
    direct = DirectReads(str(tmp_path))
    try:
        dst = torch.zeros(4, 4)
        assert not read_items(direct, md.storage_data, [past], lambda _: dst)
        assert torch.equal(dst, torch.zeros(4, 4))
        assert read_items(direct, md.storage_data, [item], lambda _: dst) and torch.equal(dst, torch.ones(4, 4))
    finally:
        direct.close()
