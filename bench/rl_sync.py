"""RL weight sync: the in-memory fp8 stream against plain copies of the same bytes, on one GPU, in one run.

The model is plain bf16 tensors under Megatron names at a preset's shapes (``stream_api.FP8Stream.of_view``: the
stream ``iter_fp8`` runs, without building a megatron-core model), made once and iterated once per pass, as a trainer
pushes its weights every step (on one GPU the plan is kept between passes; ``first pass`` rows plan again). Rows,
each the median of ``--repeats`` passes after a warm-up pass:
  bf16 params D2H       every parameter copied into pinned host memory (what a bf16 push to the host moves)
  bf16 params HBM copy  every parameter copied into GPU memory (device-to-device; GB/s count read + written)
  fp8 output D2H floor  the stream's output sizes copied from GPU memory into pinned host memory
  iter_fp8 host/cuda    the stream, device="cpu" (pinned host tensors) and device="cuda" (GPU tensors)
  buckets host/cuda     iter_fp8_buckets' form (lists of at most --bucket-mb)
GPU streams are shown as a share of the HBM copy bandwidth, counting the bf16 parameters read and the fp8 output
written; host streams against the D2H floor of their output bytes.

    python3 bench/rl_sync.py                 # one GPU, Llama-3-8B shapes (all 32 layers)
    python3 bench/rl_sync.py --tiny          # CPU (or a GPU when present), llama-200m shapes, 2 layers: a smoke run
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

RING_BYTES = 4 << 30


def build_view(arch: str, layers: int, device: torch.device, layout, seed: int = 0):
    """(dims, HF config, RankView) of random N(0, 0.02) bf16 parameters (norms near 1) at ``arch``'s shapes."""
    from megatron_fp8pb.archs import dims_from_hf
    from megatron_fp8pb.exporter.options import RankView
    from megatron_fp8pb.parallel.megatron import num_local_experts
    from megatron_fp8pb.sources.presets import preset_hf_config
    from megatron_fp8pb.sources.streamed import local_param_shapes, stage_layers
    hfc = preset_hf_config(arch, layers)
    d = dims_from_hf(hfc)
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for name, shape in local_param_shapes(d, layout):
        p = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0.0, 0.02, generator=gen)
        if "norm" in name:
            p.add_(1.0)
        params.append((name, p))
    return d, hfc, RankView(params, stage_layers(d, layout), num_local_experts(d, layout))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """(median, min) seconds of ``fn`` after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="llama-200m shapes, 2 layers (runs on the CPU)")
    ap.add_argument("--arch", default=None, help="a preset (default llama3-8b; llama-200m with --tiny)")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (0: the preset's; 2 with --tiny)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=512)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is present")
    args = ap.parse_args()
    arch = args.arch or ("llama-200m" if args.tiny else "llama3-8b")
    layers = args.layers or (2 if args.tiny else 0)
    gpu = torch.cuda.is_available() and not args.cpu

    from megatron_fp8pb.config import ParallelConfig
    from megatron_fp8pb.exporter.options import ExportOptions
    from megatron_fp8pb.parallel import session
    from megatron_fp8pb.stream_api import FP8Stream

    parallel = ParallelConfig(tp=1, backend="nccl" if gpu else "gloo", device="cuda" if gpu else "cpu")
    with session.started(parallel, megatron=False) as job:
        dev = job.device
        d, hfc, view = build_view(arch, layers, dev, job.layout)
        options = ExportOptions.from_keywords(d, out_dtype=torch.bfloat16)
        params = [p for _, p in view.params]
        bf16_bytes = sum(nbytes(p) for p in params)
        host, cuda = torch.device("cpu"), dev

        streams = {t: FP8Stream.of_view(view, d, job, hfc, options, t) for t in (host, cuda)}

        def stream(target, buckets=False, fresh=False):
            s = FP8Stream.of_view(view, d, job, hfc, options, target) if fresh else streams[target]
            for _ in (s.buckets(args.bucket_mb << 20) if buckets else s):
                pass

        sizes = [nbytes(t) for _, t in streams[host]]
        out_bytes = sum(sizes)


        # host copies land in a pinned ring (copies on one stream run in order, so reuse is safe); GPU copies in one
        # buffer as large as the parameters
        ring = min(bf16_bytes, max(RING_BYTES, max(nbytes(p) for p in params)))
        pinned = torch.empty(ring, dtype=torch.uint8, pin_memory=gpu)
        flat = torch.empty(bf16_bytes, dtype=torch.uint8, device=dev)

        def params_to(buf):
            off = 0
            for p in params:
                n = nbytes(p)
                off = 0 if off + n > buf.numel() else off
                buf[off:off + n].view(p.dtype).view(p.shape).copy_(p, non_blocking=True)
                off += n

        def output_to_host():
            src = dst = 0
            for n in sizes:
                dst = 0 if dst + n > ring else dst
                pinned[dst:dst + n].copy_(flat[src:src + n], non_blocking=True)
                src, dst = src + n, dst + n

        d2h_bf16 = timed(lambda: params_to(pinned), dev, args.repeats)
        hbm = timed(lambda: params_to(flat), dev, args.repeats)
        floor = timed(output_to_host, dev, args.repeats)
        flat = None     # free the GPU copy before the streams run
        s_host = timed(lambda: stream(host), dev, args.repeats)
        b_host = timed(lambda: stream(host, True), dev, args.repeats)
        f_host = timed(lambda: stream(host, fresh=True), dev, args.repeats)
        s_cuda = b_cuda = f_cuda = None
        if gpu:
            s_cuda = timed(lambda: stream(cuda), dev, args.repeats)
            b_cuda = timed(lambda: stream(cuda, True), dev, args.repeats)
            f_cuda = timed(lambda: stream(cuda, fresh=True), dev, args.repeats)

    name = torch.cuda.get_device_name() if gpu else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{arch} ({d.num_layers} layers) on {name}, torch {torch.__version__}: bf16 params {bf16_bytes / 1e9:.2f} "
          f"GB, stream output {out_bytes / 1e9:.2f} GB in {len(sizes)} tensors; median (min) of {args.repeats}")
    hbm_gbs = 2 * bf16_bytes / hbm[0] / 1e9
    stream_bytes = bf16_bytes + out_bytes
    print()
    print("| path | seconds | GB/s | against |")
    print("|---|---:|---:|---|")

    def row(what, t, counted, against):
        print(f"| {what} | {t[0]:.3f} ({t[1]:.3f}) | {counted / t[0] / 1e9:.1f} | {against} |")

    row("bf16 params D2H (pinned)" if gpu else "bf16 params to host (memcpy)", d2h_bf16, bf16_bytes, "")
    row("bf16 params HBM copy (read + write)" if gpu else "bf16 params copy (read + write)", hbm, 2 * bf16_bytes, "")
    row("fp8 output D2H floor" if gpu else "fp8 output copy floor", floor, out_bytes, "")
    for what, t in (("iter_fp8 host", s_host), ("buckets host", b_host), ("first pass host (planned)", f_host)):
        row(what, t, out_bytes, f"{t[0] / floor[0]:.2f}x the D2H floor; {t[0] / d2h_bf16[0]:.2f}x bf16 D2H")
    for what, t in (("iter_fp8 cuda", s_cuda), ("buckets cuda", b_cuda), ("first pass cuda (planned)", f_cuda)):
        if t is None:
            print(f"| {what} | no GPU | | |")
            continue
        share = stream_bytes / t[0] / 1e9 / hbm_gbs
        row(what + " (bf16 read + fp8 written)", t, stream_bytes,
            f"{100 * share:.0f}% of HBM copy bandwidth; {t[0] / d2h_bf16[0]:.2f}x bf16 D2H")


if __name__ == "__main__":
    main()
