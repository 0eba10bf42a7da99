"""Random HF bf16 sources in the file layouts users have, the same weights in each, and the floors of reading them.

- ``save_pretrained``: the state dict cut greedily in module order into shards (5 GB, transformers' default for
  Llama-3-8B's four files), each written by safetensors ``save_file``, which orders a file's tensors by name
  (``layers.10`` before ``layers.2``, ``lm_head`` before ``model.embed_tokens``), plus the index.
- ``hub``: the same with many small shards (1 GB), as large hub downloads come (DeepSeek-V3: 163 files).
- ``export``: tensors in module order within and across shards, written by the project's writer (the order the
  export reads them).
Every tensor's values come from a seed of its own name, so all three hold the same weights and export the same bytes.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import zlib
from pathlib import Path

LAYOUTS = ("save_pretrained", "hub", "export")


def _tensor(name: str, shape, dev: str):
    import torch
    gen = torch.Generator(device=dev).manual_seed(zlib.crc32(name.encode()))
    t = torch.randn(shape, generator=gen, device=dev, dtype=torch.float32).mul_(0.02)
    if "norm" in name:
        t.add_(1.0)
    return t.to(torch.bfloat16).cpu()


def _config_and_shapes(arch: str, layers: int):
    import torch
    from megatron_fp8pb.archs import dims_from_hf, rules_for
    from megatron_fp8pb.plan.params import expected_tensors, hf_units
    from megatron_fp8pb.sources.presets import preset_hf_config
    cfg = preset_hf_config(arch, layers)
    cfg.dtype = torch.bfloat16
    d = dims_from_hf(cfg)
    shapes = expected_tensors(rules_for(d), d)
    unit, pos = hf_units(rules_for(d), d), {n: k for k, n in enumerate(shapes)}
    order = sorted(shapes, key=lambda n: (unit.get(n, 1 << 30), pos[n]))    # module order: layer by layer
    return cfg, {n: shapes[n] for n in order}


def _save_config(cfg, path: Path) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    cfg.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[cfg.model_type]]     # as a published checkpoint names it
    tmp = Path(tempfile.mkdtemp())
    cfg.save_pretrained(str(tmp))
    shutil.copyfile(tmp / "config.json", path / "config.json")
    shutil.rmtree(tmp)


def write_layout(path: Path, arch: str, layers: int, layout: str, shard_bytes: int) -> tuple[int, int]:
    """Write the source of preset ``arch`` at ``layers`` layers in ``layout`` (one of ``LAYOUTS``) with shards of
    at most ``shard_bytes``; returns (bytes of tensor data, files). Host memory: one shard."""
    import json

    import torch
    from safetensors.torch import save_file
    from megatron_fp8pb.output.writer import CheckpointWriter, TensorSpec
    cfg, shapes = _config_and_shapes(arch, layers)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shutil.rmtree(path, ignore_errors=True)
    total = sum(2 * _numel(s) for s in shapes.values())
    if layout == "export":
        w = CheckpointWriter(path, [TensorSpec(n, torch.bfloat16, s) for n, s in shapes.items()], shard_bytes,
                             overwrite=True)
        for n, s in shapes.items():
            w.write(n, _tensor(n, s, dev))
        tmp = Path(tempfile.mkdtemp())
        _save_config(cfg, tmp)
        w.finish({"config.json": tmp / "config.json"})
        shutil.rmtree(tmp)
        return total, len(w.files)
    shards, size = [[]], 0
    for n, s in shapes.items():         # greedy in module order, as huggingface_hub's split_torch_state_dict
        b = 2 * _numel(s)
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += b
    path.mkdir(parents=True)
    weight_map = {}
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: _tensor(n, shapes[n], dev) for n in names}, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))
    _save_config(cfg, path)
    return total, len(shards)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def evict(path: Path) -> None:
    """Drop ``path``'s files from the page cache (data cold, software warm): written back first, then
    ``posix_fadvise(DONTNEED)`` per file."""
    os.sync()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _read_all(src: Path, pattern: str = "*.safetensors") -> None:
    buf = bytearray(64 << 20)
    for f in sorted(src.glob(pattern)):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def _write_bytes(path: Path, nbytes: int, chunk: int = 64 << 20) -> None:
    buf = memoryview(os.urandom(1 << 20) * (chunk >> 20))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, buf[:min(chunk, left)])
        os.fsync(fd)
    finally:
        os.close(fd)


def floors(src: Path, out_dir: Path, nbytes: int, pattern: str = "*.safetensors") -> dict:
    """Seconds to read ``src``'s ``pattern`` files cold, to write ``nbytes`` with fsync into ``out_dir`` (same disk
    as the export's output), their sum (the sequential floor), and both at once on two threads (the concurrent
    floor)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    f = out_dir / "floor.bin"
    evict(src)
    t0 = time.perf_counter()
    _read_all(src, pattern)
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _write_bytes(f, nbytes)
    write_s = time.perf_counter() - t0
    f.unlink()
    evict(src)
    reader = threading.Thread(target=_read_all, args=(src, pattern))
    t0 = time.perf_counter()
    reader.start()
    _write_bytes(f, nbytes)
    reader.join()
    both_s = time.perf_counter() - t0
    f.unlink()
    return dict(read_s=read_s, write_s=write_s, sequential_s=read_s + write_s, concurrent_s=both_s)
