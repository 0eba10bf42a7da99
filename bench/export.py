"""Export benchmark: ours vs the naive baseline (bf16 gather to rank 0, quantize there, save_file), same model, same
run, plus the disk floor (writing the same bytes with fsync). Prints a table and one summary line.

  python bench/export.py --quick            # CPU, tp=2, llama-200m shapes, < 5 minutes on 2 cores
  python bench/export.py --gpu              # one GPU, tp=1, Llama-3-8B shapes at 4 and 16 layers
  python bench/export.py --moe              # CPU, ep=2, a 16-expert Qwen3-MoE (qwen3-moe-300m shapes)
  python bench/export.py --moe --gpu        # one GPU, Qwen3-30B-A3B shapes (fewer layers)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(mode: str, nproc: int, overrides: list[str], out: Path, log: Path) -> dict:
    metrics = out.with_suffix(".json")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_port()}",
           str(ROOT / "bench" / "export_worker.py"), "--mode", mode, "--metrics", str(metrics), *overrides,
           f"output.dir={out}"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with open(log, "a") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{mode} export failed (exit {r.returncode}); see {log}")
    return json.loads(metrics.read_text())


def disk_floor(directory: Path, nbytes: int, chunk: int = 64 << 20) -> float:
    """Seconds to write ``nbytes`` into one new file in ``directory`` and fsync it."""
    path = directory / "floor.bin"
    buf = os.urandom(1 << 20) * (chunk >> 20)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    left = nbytes
    while left > 0:
        left -= os.write(fd, memoryview(buf)[:min(chunk, left)])
    os.fsync(fd)
    os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of checkpoint ``a`` equals the one of the same name in ``b``, byte for byte."""
    from safetensors import safe_open

    def tensors(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                out.update({k: f for k in fh.keys()})
        return out

    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        return False
    for k in ta:
        with safe_open(str(ta[k]), "pt") as fa, safe_open(str(tb[k]), "pt") as fb:
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            if x.dtype != y.dtype or x.shape != y.shape or x.view(-1).view(__import__("torch").uint8).ne(
                    y.view(-1).view(__import__("torch").uint8)).any():
                return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="CPU, tp=2, llama-200m shapes")
    ap.add_argument("--gpu", action="store_true", help="one GPU, tp=1, Llama-3-8B shapes")
    ap.add_argument("--moe", action="store_true", help="a mixture-of-experts model under expert parallelism")
    ap.add_argument("--arch", default=None, help="another preset (source.arch), e.g. deepseek-v3, kimi-k2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", default=None, help="comma-separated layer counts (model sizes)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="write all numbers here")
    ap.add_argument("--no-naive", action="store_true",
                    help="ours against the disk floor only (the naive baseline takes minutes per run at 32 layers)")
    args = ap.parse_args()
    if args.moe and args.gpu:
        nproc, base = 1, ["source.kind=random", "source.arch=qwen3-30b-a3b", "parallel.tp=1", "output.max_shard_size=5GB"]
        layers = [int(x) for x in (args.layers or "4").split(",")]
    elif args.moe:
        nproc, base = 2, ["source.kind=random", "source.arch=qwen3-moe-300m", "parallel.ep=2", "parallel.device=cpu",
                          "output.max_shard_size=200MB"]
        layers = [int(x) for x in (args.layers or "8").split(",")]
    elif args.gpu:
        nproc, base = 1, ["source.kind=random", "source.arch=llama3-8b", "parallel.tp=1", "output.max_shard_size=5GB"]
        layers = [int(x) for x in (args.layers or "4,16").split(",")]
    else:
        nproc, base = 2, ["source.kind=random", "source.arch=llama-200m", "parallel.tp=2", "parallel.device=cpu",
                          "output.max_shard_size=200MB"]
        layers = [int(x) for x in (args.layers or "12").split(",")]
        if args.quick:
            args.repeats = min(args.repeats, 2)
    if args.arch:
        base = [x for x in base if not x.startswith("source.arch=")] + [f"source.arch={args.arch}"]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fp8pb-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    rows, summary = [], {}
    for n in layers:
        overrides = base + [f"source.num_layers={n}"]
        res = {}
        modes = ("ours",) if args.no_naive else ("ours", "naive")
        for mode in modes:
            runs = []
            for k in range(args.repeats):
                out = work / f"{mode}-{n}-{k}"
                runs.append(run_once(mode, nproc, overrides, out, log))
                if k < args.repeats - 1:
                    shutil.rmtree(out)
            res[mode] = runs
        identical = None if args.no_naive else same_tensors(work / f"ours-{n}-{args.repeats - 1}",
                                                            work / f"naive-{n}-{args.repeats - 1}")
        out_bytes = res["ours"][-1]["out_bytes"]
        floors = [disk_floor(work, out_bytes) for _ in range(args.repeats)]
        for mode in modes:
            shutil.rmtree(work / f"{mode}-{n}-{args.repeats - 1}")
        floor = statistics.median(floors)
        med = {m: statistics.median(r["seconds"] for r in res[m]) for m in res}
        for m in modes:
            last = res[m][-1]
            rows.append((f"{n} layers", m, med[m], med[m] / floor, last["bytes_moved"] / 1e6,
                         last["rank0_rss_peak"] / 1e9, (last["rank0_rss_peak"] - last["rank0_rss_start"]) / 1e9))
        rows.append((f"{n} layers", "disk floor", floor, 1.0, 0.0, 0.0, 0.0))
        if args.no_naive:
            summary[n] = dict(over_floor=med["ours"] / floor, out_gb=out_bytes / 1e9, runs=res, floors=floors)
            continue
        summary[n] = dict(
            speedup=med["naive"] / med["ours"], over_floor=med["ours"] / floor, identical=identical,
            bytes_moved_ratio=(res["ours"][-1]["bytes_moved"] / res["naive"][-1]["bytes_moved"]
                               if res["naive"][-1]["bytes_moved"] else float("nan")),
            rss_ratio=res["ours"][-1]["rank0_rss_peak"] / res["naive"][-1]["rank0_rss_peak"],
            out_gb=out_bytes / 1e9, runs=res, floors=floors)
    import torch
    dev = torch.cuda.get_device_name(0) if args.gpu and torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\nexport benchmark on {dev}, nproc={nproc}, medians of {args.repeats} run(s)\n")
    print("| model | variant | seconds | x disk floor | MB moved between ranks | rank0 peak RSS GB | "
          "rank0 RSS growth GB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.1f} | {r[5]:.2f} | {r[6]:.2f} |")
    if args.no_naive:
        print(f"ours_vs_floor={summary[layers[-1]]['over_floor']:.2f}")
        return
    for n, s in summary.items():
        print(f"{n} layers: output {s['out_gb']:.2f} GB, ours == naive byte for byte: {s['identical']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev, "summary": {str(k): v for k, v in summary.items()}},
                                              indent=2))
    last = summary[layers[-1]]
    print(f"speedup_vs_naive={last['speedup']:.2f} bytes_moved_ratio={last['bytes_moved_ratio']:.2f} "
          f"rank0_peak_rss_ratio={last['rss_ratio']:.2f}")
    if not all(s["identical"] for s in summary.values()):
        raise SystemExit("ours and naive outputs differ")


if __name__ == "__main__":
    main()
