"""Writes an HF bf16 checkpoint of random weights for a config.json, as ``save_pretrained`` lays one out (tensors
name-sorted inside each file, files of at most ``--shard-gb``), for benchmarks at real shapes without a download.

    python bench/family_sources.py CONFIG_DIR OUT_DIR [--shard-gb 5]

The tensors are those the architecture unit names (``expected_tensors``), generated on the GPU where present.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_fp8pb.archs import dims_from_hf, rules_for  # noqa: E402
from megatron_fp8pb.sources.hf import hf_config  # noqa: E402
from megatron_fp8pb.plan.params import expected_tensors  # noqa: E402
from megatron_fp8pb.sources.tiny import tensor_dtypes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--shard-gb", type=float, default=5.0)
    a = ap.parse_args()
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(a.config_dir) / "config.json", out / "config.json")
    d = dims_from_hf(hf_config(a.config_dir))
    rules = rules_for(d)
    own = tensor_dtypes(rules, d)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    names = sorted(expected_tensors(rules, d).items())
    limit = int(a.shard_gb * 1e9)
    files, cur, size = [], {}, 0
    for name, shape in names:
        x = torch.randn(shape, generator=gen, device=dev, dtype=torch.float32)
        x = (1.0 + 0.1 * x) if "norm" in name else x if "embed_tokens" in name else 0.02 * x
        t = x.to(own.get(name, torch.bfloat16)).cpu()
        if cur and size + t.numel() * t.element_size() > limit:
            files.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += t.numel() * t.element_size()
    files.append(cur)
    weight_map, total = {}, 0
    for k, chunk in enumerate(files):
        fname = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(chunk, str(out / fname), metadata={"format": "pt"})     # safetensors sorts by name
        weight_map.update({n: fname for n in chunk})
        total += sum(t.numel() * t.element_size() for t in chunk.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    print(f"{out}: {len(weight_map)} tensors, {total / 1e9:.2f} GB in {len(files)} file(s)")


if __name__ == "__main__":
    main()
