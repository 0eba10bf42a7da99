"""Several writers of one checkpoint, in one process: the writer of each rank, the owner of each tensor, and two
CheckpointWriters sharing one plan's files (the second opens what the first made) give the one-writer bytes."""
import hashlib
import json

import pytest
import torch

from megatron_fp8pb.output.node_writers import owners, writer_ranks
from megatron_fp8pb.plan.params import Piece
from megatron_fp8pb.output.writer import CheckpointWriter, TensorSpec


def test_writer_of_each_rank_is_the_lowest_rank_of_its_node():
    assert writer_ranks(["node 0", "node 0", "node 1", "node 1"]) == [0, 0, 2, 2]
    assert writer_ranks(["a", "b", "a", "b"]) == [0, 1, 0, 1]     # ranks interleaved over two hosts
    assert writer_ranks(["h"] * 3) == [0, 0, 0]
    for nodes in (["node 0", "node 0", "node 1", "node 1"], ["a", "b", "a", "b"]):
        assert all(w <= r for r, w in enumerate(writer_ranks(nodes)))   # pieces only travel to lower ranks


def _piece(name, src, offset=0, length=4):
    return Piece(name, (8, 8), 0, offset, length, True, "tp", None, src=src)


def test_a_tensor_is_written_by_the_node_of_its_lowest_holder():
    writer_of = [0, 0, 2, 2]
    by_name = {"a.weight": [_piece("a.weight", 1, 0), _piece("a.weight", 3, 4)],
               "b.weight": [_piece("b.weight", 3, 0), _piece("b.weight", 2, 4)],
               "c.weight": [_piece("c.weight", 1, 0, 8)]}
    assert owners(by_name, writer_of) == {"a.weight": 0, "b.weight": 2, "c.weight": 0}


def _plan():
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.w{j}": torch.randn(64 + 8 * i, 48, generator=g).to(torch.bfloat16)
               for i in range(3) for j in range(2)}
    tensors["model.norm.weight"] = torch.ones(48, dtype=torch.float32)
    return tensors, [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]


def _digests(out):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())}


def test_two_writers_of_one_plan_write_the_one_writer_bytes(tmp_path):
    tensors, specs = _plan()
    one = CheckpointWriter(tmp_path / "one", specs, "20KB")
    for n, t in tensors.items():
        one.write(n, t)
    one.finish({"config.json": b"{}"})
    names = list(tensors)
    first = CheckpointWriter(tmp_path / "two", specs, "20KB", mine=set(names[::2]))
    second = CheckpointWriter(tmp_path / "two", specs, "20KB", mine=set(names[1::2]), create=False)
    assert len(first.files) > 2 and first.planned_bytes + second.planned_bytes == sum(s.nbytes for s in specs)
    for n in names[1::2]:
        second.write(n, tensors[n])
    second.check_complete()
    assert not second._fds      # each file it wrote into: fsynced and closed
    for n in names[::2]:
        first.write(n, tensors[n])
    first.finish({"config.json": b"{}"})
    assert _digests(tmp_path / "one") == _digests(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "model.safetensors.index.json").read_text())["weight_map"].keys() == \
        set(names)


def test_second_writer_refuses_a_missing_or_different_plan(tmp_path):
    tensors, specs = _plan()
    with pytest.raises(FileNotFoundError, match="output.writers=node needs output.dir on a filesystem that every "
                                                "node shares"):
        CheckpointWriter(tmp_path / "out", specs, "20KB", mine=set(), create=False)
    first = CheckpointWriter(tmp_path / "out", specs, "20KB", mine=set())
    with pytest.raises(ValueError, match="differs from this writer's plan"):
        CheckpointWriter(tmp_path / "out", specs[:-1], "20KB", mine=set(), create=False)
    second = CheckpointWriter(tmp_path / "out", specs, "20KB", mine={specs[0].name}, create=False)
    with pytest.raises(RuntimeError, match="1 planned tensor"):
        second.check_complete()
    second.abort()      # the writer that did not create the directory leaves it
    assert first.tmp.exists()
    first.abort()
    assert not first.tmp.exists()


def test_config_key():
    from megatron_fp8pb.config import ExportConfig, load_config
    assert ExportConfig().output.writers == "rank0"
    assert load_config(None, ["output.writers=node"]).output.writers == "node"
    with pytest.raises(ValueError, match="output.writers='disk': choose one of rank0, node"):
        load_config(None, ["output.writers=disk"])
