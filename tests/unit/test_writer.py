import json
import os

import pytest
import torch
from safetensors import safe_open

from megatron_fp8pb.quant.reference import dequantize_blockfp8, e4m3_error_bound, quantize_blockfp8
from megatron_fp8pb.output.writer import CheckpointWriter, TensorSpec, parse_size, partial_dir, plan_shards


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(3):
        for m, shape in (("q_proj", (320, 200)), ("down_proj", (200, 704))):
            w = torch.randn(shape, generator=g).to(torch.bfloat16)
            q, s = quantize_blockfp8(w)
            out[f"model.layers.{i}.{m}.weight"] = (w, q, s)
    return out


def _write(out_dir, max_shard="60KB", overwrite=False, fail_after=None):
    data = _tensors()
    specs, stream = [], []
    for name, (_, q, s) in data.items():
        scale = name[:-len(".weight")] + ".weight_scale_inv"
        specs += [TensorSpec(name, q.dtype, tuple(q.shape)), TensorSpec(scale, s.dtype, tuple(s.shape))]
        stream += [(name, q), (scale, s)]
    norm = torch.ones(200, dtype=torch.bfloat16)
    specs.append(TensorSpec("model.norm.weight", torch.bfloat16, (200,)))
    stream.append(("model.norm.weight", norm))
    w = CheckpointWriter(out_dir, specs, max_shard, overwrite)
    try:
        for k, (name, t) in enumerate(stream):
            if fail_after is not None and k == fail_after:
                raise OSError(28, "No space left on device (injected)")
            w.write(name, t)
        w.finish({"config.json": json.dumps({"model_type": "test"}).encode()})
    except BaseException:
        w.abort()
        raise
    return data


def test_index_complete_and_shards_respected(tmp_path):
    out = tmp_path / "ckpt"
    data = _write(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    total, seen = 0, {}
    for f in files:
        with safe_open(str(out / f), "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
            for k in fh.keys():
                t = fh.get_tensor(k)
                seen[k] = f
                total += t.numel() * t.element_size()
    assert seen == index["weight_map"] and index["metadata"]["total_size"] == total
    for name in data:
        assert index["weight_map"][name] == index["weight_map"][name[:-len(".weight")] + ".weight_scale_inv"]
    for name, (_, q, s) in data.items():
        with safe_open(str(out / index["weight_map"][name]), "pt") as fh:
            assert torch.equal(fh.get_tensor(name).view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(fh.get_tensor(name[:-7] + ".weight_scale_inv"), s)


def test_plan_shards_keeps_weight_with_scale():
    specs = [TensorSpec("a.weight", torch.float8_e4m3fn, (100, 100)),
             TensorSpec("a.weight_scale_inv", torch.float32, (1, 1)),
             TensorSpec("b.weight", torch.float8_e4m3fn, (100, 100)),
             TensorSpec("b.weight_scale_inv", torch.float32, (1, 1))]
    shards = plan_shards(specs, 10_002)
    assert [[s.name for s in sh] for sh in shards] == [["a.weight", "a.weight_scale_inv"],
                                                       ["b.weight", "b.weight_scale_inv"]]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("five")


def test_refuses_non_empty_output_and_overwrites_when_asked(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="output.overwrite=true"):
        _write(out)
    _write(out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_failure_mid_write_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(OSError, match="No space"):
        _write(out, fail_after=5)
    assert not out.exists() and not partial_dir(out).exists()
    _write(out)     # a re-run needs no cleanup
    assert (out / "model.safetensors.index.json").exists()


def test_refuses_an_output_larger_than_the_free_space_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 12, 10 ** 12 - 1000, 1000))
    out = tmp_path / "ckpt"
    with pytest.raises(ValueError, match=r"output.dir .*ckpt: the export writes 0.615 MB but its filesystem has "
                                         r"0.001 MB free; free 0.614 MB there or choose an output.dir on another "
                                         r"disk"):
        _write(out)
    assert not out.exists() and not partial_dir(out).exists()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 12, 0, 10 ** 12))
    _write(out)
    assert (out / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("report", ["no size", "an error"])
def test_a_filesystem_that_reports_no_free_space_figure_is_not_checked(tmp_path, monkeypatch, report):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")

    def disk_usage(p):
        if report == "an error":
            raise OSError(38, "Function not implemented")
        return usage(0, 0, 0)       # a FUSE mount without statfs
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    _write(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()


def test_round_trip_through_dcp_quantized_reader(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.quantized_hf_storage import QuantizedHuggingFaceStorageReader
    out = tmp_path / "ckpt"
    data = _write(out)
    state = {name: torch.empty(w.shape, dtype=torch.float32) for name, (w, _, _) in data.items()}
    dcp.load(state, storage_reader=QuantizedHuggingFaceStorageReader(str(out)), no_dist=True)
    for name, (w, q, s) in data.items():
        assert torch.equal(state[name], dequantize_blockfp8(q, s, dtype=torch.float32))
        assert ((state[name] - w.float()).abs() <= e4m3_error_bound(s, tuple(w.shape)) * (1 + 1e-5)).all()


def test_background_writer_row_chunks(tmp_path):
    from megatron_fp8pb.output.writer import BackgroundWriter
    w = torch.randn(300, 70).to(torch.bfloat16)
    out = tmp_path / "ckpt"
    bw = BackgroundWriter(CheckpointWriter(out, [TensorSpec("a.weight", torch.bfloat16, (300, 70))], "1GB"))
    for r in (200, 0, 100):   # any order
        bw.submit("a.weight", w[r:r + 100].clone(), row0=r)
    with pytest.raises(ValueError, match="a.weight"):
        bw.submit("a.weight", w[:10, :5].clone(), row0=0)
    bw.finish({})
    with safe_open(str(out / "model-00001-of-00001.safetensors"), "pt") as fh:
        assert torch.equal(fh.get_tensor("a.weight"), w)


def test_background_writer_fault_names_the_rank_it_was_given(tmp_path, monkeypatch):
    """Fault injection asks the writer for its rank, not the process group (none exists here)."""
    import torch.distributed as dist
    from megatron_fp8pb.faults import ExportError
    from megatron_fp8pb.output.writer import BackgroundWriter
    assert not dist.is_initialized()
    monkeypatch.setenv("FP8PB_INJECT_FAULT", "3:write:enospc")
    spec = [TensorSpec("a.weight", torch.bfloat16, (4, 4))]
    bw = BackgroundWriter(CheckpointWriter(tmp_path / "ckpt", spec, "1GB"), rank=3)
    bw.submit("a.weight", torch.zeros(4, 4, dtype=torch.bfloat16))
    with pytest.raises(ExportError, match=r"^rank 3, stage write: OSError: .*No space left"):
        bw.finish({})
    bw.abort()
