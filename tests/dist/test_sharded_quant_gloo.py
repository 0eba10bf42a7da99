"""Shard-consistent quantization through real gloo process groups, byte-identical to the full-tensor reference."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import free_port
from megatron_fp8pb.parallel import collectives as coll
from megatron_fp8pb.quant.reference import quantize_blockfp8_reference
from megatron_fp8pb.exporter.assemble import Assembler as _Assembler
from megatron_fp8pb.exporter.quantize import quantize_unit
from megatron_fp8pb.plan.params import Piece
from megatron_fp8pb.plan.write_order import WriteOrder
from megatron_fp8pb.output.staging import SlabPool


class _Groups:
    def __init__(self, group):
        self.tp = self.etp = group
        self.device = torch.device("cpu")


class _Sink:
    """Stands in for the writer on rank 0: keeps what it is handed."""
    def __init__(self):
        self.got = {}

    def submit(self, name, t, event=None, done=None, row0=None):
        if row0 is None:
            self.got[name] = t.clone()
        else:   # a row chunk of a tensor larger than a staging slab
            self.got.setdefault(name, []).append((row0, t.clone()))
        if done is not None:
            done()

    def check(self):
        pass

    def assembled(self, name):
        got = self.got[name]
        return torch.cat([t for _, t in sorted(got, key=lambda x: x[0])]) if isinstance(got, list) else got


def _worker(rank, world, port, lengths, dim, result_path, slab_bytes=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    total, other = sum(lengths), 260
    full_shape = (total, other) if dim == 0 else (other, total)
    w = torch.randn(full_shape, generator=torch.Generator().manual_seed(total)).to(torch.bfloat16)
    offs = [sum(lengths[:r]) for r in range(world)]
    pieces = [Piece("x.weight", full_shape, dim, offs[r], lengths[r], True, "tp", WriteOrder(1, 0, -1, 0), r)
              for r in range(world)]
    mine = (pieces[rank], w.narrow(dim, offs[rank], lengths[rank]).clone())
    traffic = coll.Traffic()
    (payload,) = quantize_unit([mine], _Groups(dist.group.WORLD), traffic, torch.bfloat16)
    if rank != 0:
        for t in payload:
            coll.send_tensor(t, 0, traffic, torch.device("cpu"))
    else:
        sink = _Sink()
        asm = _Assembler(sink, traffic, torch.device("cpu"), torch.bfloat16, SlabPool(slab_bytes or w.numel(), 2))
        asm.tensor(pieces, {("x.weight", 0): payload})
        q, s = quantize_blockfp8_reference(w)
        ok = torch.equal(sink.assembled("x.weight").view(torch.uint8), q.view(torch.uint8)) and torch.equal(
            sink.got["x.weight_scale_inv"], s)
        fp8_bytes = sum(lengths[1:]) * other
        with open(result_path, "w") as f:
            f.write(f"{int(ok)} {traffic.p2p_received} {fp8_bytes}")
    dist.destroy_process_group()


@pytest.mark.parametrize("lengths", [[320], [176, 200], [320, 176, 200], [200, 176, 320, 200]])
@pytest.mark.parametrize("dim", [0, 1])
def test_sharded_equals_reference(tmp_path, lengths, dim):
    out = tmp_path / "result"
    mp.spawn(_worker, args=(len(lengths), free_port(), lengths, dim, str(out)), nprocs=len(lengths), join=True)
    ok, received, fp8_bytes = map(int, out.read_text().split())
    assert ok == 1
    # ~1 byte per parameter travels: fp8 bytes plus a few scale rows, never bf16
    assert fp8_bytes <= received <= fp8_bytes * 1.05 + 4096


def test_rows_streamed_through_small_slabs(tmp_path):
    """A tensor larger than a staging slab is written in row chunks and still equals the reference."""
    out = tmp_path / "result"
    lengths = [176, 200, 320]
    mp.spawn(_worker, args=(3, free_port(), lengths, 0, str(out), 260 * 50), nprocs=3, join=True)
    assert out.read_text().split()[0] == "1"
