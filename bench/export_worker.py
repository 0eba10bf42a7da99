"""One timed export under torchrun (``--mode ours|naive``); rank 0 writes its metrics as JSON."""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident memory every few milliseconds while active."""

    def __init__(self, every_s: float = 0.005):
        self.every_s, self.peak, self._stop = every_s, rss_bytes(), threading.Event()

    def __enter__(self):
        self.start = rss_bytes()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.every_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("ours", "naive"), required=True)
    ap.add_argument("--metrics", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from megatron_fp8pb.parallel import session
    from megatron_fp8pb.config import load_config
    cfg = load_config(None, args.overrides)
    with session.started(cfg.parallel) as job:
        timed_export(args, cfg, job)


def timed_export(args, cfg, job) -> None:
    """Build the source, time one export (``args.mode``), write rank 0's metrics to ``args.metrics``."""
    from megatron_fp8pb.parallel import collectives as coll
    from megatron_fp8pb.exporter.pipeline import run_export
    from megatron_fp8pb.exporter.options import ExportOptions, RankView
    from megatron_fp8pb.sources.registry import build_source
    from naive_export import naive_export
    layout, groups, on_gpu = job.layout, job.groups, job.on_gpu
    src = build_source(cfg, layout, on_gpu)
    view = RankView.of_source(src, layout)
    options = ExportOptions(max_shard_size=cfg.output.max_shard_size, overwrite=True, out_dtype=src.dtype)
    if on_gpu:
        torch.cuda.synchronize()
    coll.barrier()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if args.mode == "ours":
            res = run_export(view, src.dims, layout, groups, src.hf_config, cfg.output.dir, options)
            traffic = res.traffic
        else:
            traffic = naive_export(view, src.dims, layout, groups, src.hf_config, cfg.output.dir, options)
        coll.barrier()
        seconds = time.perf_counter() - t0
    moved_total = coll.gather_objects(traffic.p2p_sent + traffic.allreduce)
    if coll.rank() == 0:
        out_bytes = sum(f.stat().st_size for f in Path(cfg.output.dir).glob("*.safetensors"))
        Path(args.metrics).write_text(json.dumps({
            "mode": args.mode, "seconds": seconds, "bytes_moved": sum(moved_total),
            "rank0_rss_start": mem.start, "rank0_rss_peak": mem.peak, "out_bytes": out_bytes}))


if __name__ == "__main__":
    main()
