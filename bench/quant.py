"""Block-FP8 quantizer throughput vs a plain device copy of the same tensor, measured in the same run.

GB/s counts bytes read + written: quantizer = input + fp8 output + float32 scales; copy = 2 x input.
CPU: the torch reference path. CUDA: the fused Triton kernel (amax/448 and ue8m0 power-of-two scales), the two-pass Triton path (block_amax + quantize_rows,
as used on distributed pieces; nominal bytes, it reads the input twice) and the torch reference on the GPU.

    python3 bench/quant.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_fp8pb.quant import triton_kernel as bt  # noqa: E402
from megatron_fp8pb.quant import blockmath  # noqa: E402

CPU_SIZES = [(1024, 1024), (2048, 2048), (4096, 4096)]
GPU_SIZES = [(4096, 4096), (8192, 8192), (14336, 4096), (4096, 14336)]


def torch_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``blockfp8.quantize_blockfp8_reference`` without the NaN/Inf check (plain torch on w's device)."""
    s = blockmath.scale_inv_from_amax(blockmath.partial_block_amax(w, 0, 0))
    return blockmath.quantize_piece(w, s, 0, 0), s


def triton_two_pass(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = blockmath.scale_inv_from_amax(bt.block_amax(w, 0))
    return bt.quantize_rows(w, s, 0), s


def triton_fused_ue8m0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return bt.quantize(w, scale_fmt="ue8m0")


def time_cpu(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_gpu(fn, reps: int) -> float:
    try:
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=reps * 10, return_mode="median") / 1e3
    except ImportError:
        pass
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def bench(device: str, paths: dict, sizes, dtype, reps: int) -> list[tuple]:
    timer = time_gpu if device == "cuda" else time_cpu
    rows = []
    for n, k in sizes:
        w = torch.randn(n, k, device=device).to(dtype)
        dst = torch.empty_like(w)
        copy_s = timer(partial(dst.copy_, w), reps)
        copy_gbs = 2 * w.nbytes / copy_s / 1e9
        q_bytes = w.nbytes + w.numel() + blockmath.num_blocks(n, 128) * blockmath.num_blocks(k, 128) * 4
        for name, fn in paths.items():
            t = timer(partial(fn, w), reps)
            gbs = q_bytes / t / 1e9
            rows.append((device, name, (n, k), str(dtype).replace("torch.", ""), t * 1e3, gbs, copy_gbs,
                         gbs / copy_gbs))
        del w, dst
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    cpu_sizes = CPU_SIZES[:2] if args.quick else CPU_SIZES
    rows += bench("cpu", {"torch reference": torch_reference}, cpu_sizes, torch.bfloat16, 3 if args.quick else 5)
    gpu_name = None
    if torch.cuda.is_available():
        gpu_name = torch.cuda.get_device_name()
        paths = {"torch reference": torch_reference}
        if bt.available():
            paths = {"triton fused": bt.quantize, "triton fused ue8m0": triton_fused_ue8m0,
                     "triton 2-pass": triton_two_pass, **paths}
        gpu_sizes = GPU_SIZES[:2] if args.quick else GPU_SIZES
        rows += bench("cuda", paths, gpu_sizes, torch.bfloat16, 10 if args.quick else 30)

    print(f"torch {torch.__version__}, cpu threads {torch.get_num_threads()}"
          + (f", gpu {gpu_name}" if gpu_name else ", no gpu"))
    print()
    print("| device | path | shape | dtype | ms | GB/s | copy GB/s | ratio |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for d, p, s, dt, ms, gbs, cgbs, r in rows:
        print(f"| {d} | {p} | {s[0]}x{s[1]} | {dt} | {ms:.3f} | {gbs:.1f} | {cgbs:.1f} | {r:.2f} |")
    print()
    fused = [r for r in rows if r[0] == "cuda" and r[1] == ("triton fused" if bt.available() else "torch reference")]
    if fused:
        big = max(fused, key=lambda r: r[2][0] * r[2][1])
        print(f"summary: {big[1]} {big[2][0]}x{big[2][1]} {big[3]} on {gpu_name}: {big[5]:.0f} GB/s vs device copy {big[6]:.0f} GB/s "
              f"= {100 * big[7]:.0f}% of copy bandwidth")
    else:
        big = max(rows, key=lambda r: r[2][0] * r[2][1])
        print(f"summary: no GPU; cpu {big[1]} {big[2][0]}x{big[2][1]}: {big[5]:.2f} GB/s vs copy {big[6]:.2f} GB/s "
              f"= {100 * big[7]:.0f}% of copy bandwidth")


if __name__ == "__main__":
    main()
