"""Shared test helpers: HF source checkpoints on disk, torchrun launches, byte-exact comparison."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_hf_source(path: Path, cfg, seed: int = 0, files: int = 2) -> dict[str, torch.Tensor]:
    """An HF bf16 checkpoint (config.json + sharded safetensors + index + generation_config) with seeded weights."""
    from megatron_fp8pb.tiny import random_hf_state
    state = random_hf_state(cfg, seed)
    path.mkdir(parents=True, exist_ok=True)
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(str(path))
    (path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7}))
    names = list(state)
    chunks = [names[i::files] for i in range(files)]
    weight_map = {}
    for k, chunk in enumerate(chunks):
        fname = f"model-{k + 1:05d}-of-{files:05d}.safetensors"
        save_file({n: state[n].contiguous() for n in chunk}, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in chunk})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return state


def torchrun(nproc: int, args: list[str], script: str = "launch/export.py", timeout: int = 600,
             env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", script, *args]
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e)


def read_output(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    got = {}
    for name, f in index.items():
        with safe_open(str(out / f), "pt") as fh:
            got[name] = fh.get_tensor(name)
    return got


def mismatches(out: Path, source: dict[str, torch.Tensor], quantized: bool = True,
               scale_fmt: str = "amax") -> list[str]:
    """Names whose bytes differ from the single-process reference quantization (or the source when unquantized)."""
    from megatron_fp8pb.blockfp8 import quantize_blockfp8_reference
    got = read_output(out)
    bad = []
    for name, t in got.items():
        if name.endswith(".weight_scale_inv"):
            w = name[:-len("_scale_inv")]
            _, s = quantize_blockfp8_reference(source[w], scale_fmt=scale_fmt)
            if not torch.equal(t, s):
                bad.append(name)
        elif t.dtype == torch.float8_e4m3fn:
            q, _ = quantize_blockfp8_reference(source[name], scale_fmt=scale_fmt)
            if not torch.equal(t.view(torch.uint8), q.view(torch.uint8)):
                bad.append(name)
        elif name not in source or not torch.equal(t, source[name]):
            bad.append(name)
    written = {n for n in got if not n.endswith("_scale_inv")}
    expected = set(source)
    if "lm_head.weight" in written and "lm_head.weight" not in expected:
        expected.add("lm_head.weight")
    bad += [f"missing {n}" for n in sorted(expected - written)]
    return bad
