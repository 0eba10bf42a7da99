"""End to end from an HF bf16 checkpoint on disk to the FP8 checkpoint on disk: ours against the read + write floor
(reading the source files, writing the output's bytes with fsync) and against llm-compressor FP8_BLOCK when it can
be imported, same checkpoint, same run, page cache dropped before each timed step where allowed (root).

  python bench/e2e.py --quick                 # CPU, tp=2, llama-200m shapes at 4 and 12 layers, < 5 minutes
  python bench/e2e.py --gpu                   # one GPU, Llama-3-8B shapes (32 layers; 4 for the RSS slope)
  python bench/e2e.py --gpu --arch llama3-70b --layers 2,8
  python bench/e2e.py --gpu --repeats 2 --megatron   # also the same weights as a Megatron dist checkpoint (tp=1)
  python bench/e2e.py --gpu --repeats 3 --peer-repeats 2 --trace     # medians, and the disks' MB/s every 0.5 s

Last line: ``e2e_vs_floor=X peak_rss_slope=Y`` (ours over the floor at the deepest source; growth of the largest
rank peak RSS per byte of source between the two depths).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drop_caches(*outputs: Path) -> bool:
    """Remove ``outputs`` left by an earlier run (each timed run writes a new directory, as a first export does: an
    existing one is replaced, and freeing its blocks would be timed too), flush dirty pages and drop the page cache
    (needs root); False where not allowed."""
    for out in outputs:
        shutil.rmtree(out, ignore_errors=True)
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def write_random_source(path: Path, arch: str, layers: int, seed: int = 0, shard: str = "5GB") -> int:
    """An HF bf16 checkpoint of preset ``arch`` at ``layers`` layers with seeded N(0, 0.02) weights, written tensor
    by tensor (bounded memory) through the project's sharded writer. Returns the bytes of tensor data."""
    import torch
    from megatron_fp8pb.archs import dims_from_hf, rules_for
    from megatron_fp8pb.plan.params import expected_tensors
    from megatron_fp8pb.sources.presets import preset_hf_config
    from megatron_fp8pb.output.writer import CheckpointWriter, TensorSpec
    cfg = preset_hf_config(arch, layers)
    cfg.dtype = torch.bfloat16
    shapes = expected_tensors(rules_for(dims_from_hf(cfg)), dims_from_hf(cfg))
    specs = [TensorSpec(n, torch.bfloat16, s) for n, s in shapes.items()]
    w = CheckpointWriter(path, specs, shard, overwrite=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(seed)
    for n, s in shapes.items():
        t = torch.randn(s, generator=gen, device=dev, dtype=torch.float32).mul_(0.02)
        if "norm" in n:
            t.add_(1.0)
        w.write(n, t.to(torch.bfloat16))
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    cfg.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[cfg.model_type]]     # as a published checkpoint names it
    tmp = Path(tempfile.mkdtemp())
    cfg.save_pretrained(str(tmp))
    w.finish({"config.json": tmp / "config.json"})
    shutil.rmtree(tmp)
    return sum(s.nbytes for s in specs)


def save_megatron_checkpoint(src: Path, dst: Path, log: Path) -> float:
    """The HF checkpoint ``src`` saved as a Megatron distributed checkpoint (torch_dist, tp=1, one process on the
    CPU: megatron-core builds the model and saves it); returns the seconds it took."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={_port()}",
           str(ROOT / "tests" / "dist" / "dcp_worker.py"), "save", str(src), str(dst), "1", "1", "1"]
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(min(16, os.cpu_count() or 1)))
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    with open(log, "a") as f:
        f.write(r.stdout + r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"saving the Megatron checkpoint failed (exit {r.returncode}); see {log}")
    return time.perf_counter() - t0


def read_floor(src: Path, pattern: str = "*.safetensors") -> float:
    """Seconds to read every ``pattern`` file of ``src`` once (64 MiB reads into one buffer)."""
    buf = bytearray(64 << 20)
    t0 = time.perf_counter()
    for f in sorted(src.glob(pattern)):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


def write_floor(directory: Path, nbytes: int, chunk: int = 64 << 20) -> float:
    path = directory / "floor.bin"
    buf = memoryview(os.urandom(1 << 20) * (chunk >> 20))
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    left = nbytes
    while left > 0:
        left -= os.write(fd, buf[:min(chunk, left)])
    os.fsync(fd)
    os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def startup_floor(gpu: bool) -> float:
    """Seconds for a fresh interpreter to import torch (and create a CUDA context with ``gpu``): what any torch tool
    pays before its first byte, from a cold cache when the caller dropped it."""
    code = "import torch; torch.zeros(1, device='cuda')" if gpu else "import torch"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def out_bytes(out: Path) -> int:
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def timed(cmd: list[str], env: dict, trace: bool) -> tuple[subprocess.CompletedProcess, float, str]:
    """Run ``cmd``: its result, wall seconds, and with ``trace`` what the disks did meanwhile (``DiskTrace``)."""
    from disk_trace import DiskTrace
    with DiskTrace() if trace else contextlib.nullcontext() as dt:
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        seconds = time.perf_counter() - t0
    return r, seconds, dt.table() if trace else ""


def run_ours(src: Path, out: Path, nproc: int, extra: list[str], log: Path, source: list[str] | None = None,
             trace: bool = False) -> dict:
    """``source``: the source keys (default: the HF checkpoint ``src``). ``trace``: record the disks' activity."""
    # one process needs no launcher (launch/export.py starts a single-rank group itself)
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                                      f"--master_port={_port()}"]
    source = source or ["source.kind=hf", f"source.path={src}"]
    cmd = [sys.executable, *launcher, str(ROOT / "launch" / "export.py"), *source, f"output.dir={out}",
           "output.verify=false", "output.overwrite=true", *extra]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r, seconds, disk = timed(cmd, env, trace)
    with open(log, "a") as f:
        f.write(r.stdout + r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"export failed (exit {r.returncode}); see {log}\n{r.stderr[-2000:]}")
    m = re.search(r"peak RSS per rank: ([\d. ]+) GB; the export added: ([\d. ]+) GB", r.stdout)
    rss, added = ([float(x) * 1e9 for x in g.split()] for g in m.groups())
    phases = re.search(r"phases: (.*?); files", r.stdout)
    marks = re.search(r"wall clock since the process started: (.*)", r.stdout)
    return dict(seconds=seconds, rss=rss, added=added, marks=marks.group(1) if marks else "",
                phases=phases.group(1) if phases else "", out_bytes=out_bytes(out), disk=disk)


def _median_run(runs: list[dict], key: str = "seconds") -> dict:
    """The median of repeated runs by ``key`` (the slower of two)."""
    return sorted(runs, key=lambda t: t[key])[len(runs) // 2]


def _show(line: str, run: dict) -> None:
    """A timed run's line, then its disk trace where one was recorded."""
    print(line, flush=True)
    if run["disk"]:
        print(run["disk"], flush=True)


def _runs_label(seconds: list[float]) -> str:
    return "" if len(seconds) == 1 else f" (median of {', '.join(f'{x:.2f}' for x in seconds)})"


def _peer_path(work: Path) -> str:
    """PYTHONPATH for the peer: where ``datasets`` (imported by llm-compressor, unused by a data-free recipe) is not
    installed, a stand-in package with the names it imports."""
    path = os.environ.get("PYTHONPATH", "")
    try:
        import datasets  # noqa: F401
        return path
    except ImportError:
        stub = work / "peer-stub" / "datasets"
        (stub / "formatting").mkdir(parents=True, exist_ok=True)
        (stub / "__init__.py").write_text(
            "__version__ = '4.8.4'\nclass Dataset: pass\nclass DatasetDict(dict): pass\n"
            "class IterableDataset: pass\nclass IterableDatasetDict(dict): pass\n"
            "def load_dataset(*a, **k): raise RuntimeError('datasets stand-in: data-free recipes only')\n"
            "def load_from_disk(*a, **k): raise RuntimeError('datasets stand-in: data-free recipes only')\n")
        (stub / "formatting" / "__init__.py").write_text("")
        (stub / "formatting" / "formatting.py").write_text("class LazyRow: pass\n")
        return f"{path}:{stub.parent}" if path else str(stub.parent)


def run_peer(src: Path, out: Path, work: Path, log: Path, trace: bool = False) -> dict | None:
    env = dict(os.environ, PYTHONPATH=_peer_path(work), PYTHONWARNINGS="ignore")
    probe = subprocess.run([sys.executable, "-c", "import llmcompressor"], capture_output=True, text=True, env=env)
    if probe.returncode != 0:
        print(f"llm-compressor not importable, peer skipped: {probe.stderr.strip().splitlines()[-1:]}")
        return None
    r, seconds, disk = timed([sys.executable, str(ROOT / "bench" / "peer_llmcompressor.py"), str(src), str(out)],
                             env, trace)
    with open(log, "a") as f:
        f.write(r.stdout + r.stderr)
    m = re.search(r"PEER_RESULT (.*)", r.stdout)
    if r.returncode != 0 or not m:
        print(f"llm-compressor failed (exit {r.returncode}): {r.stderr[-1500:]}")
        return None
    res = json.loads(m.group(1))
    t0 = time.perf_counter()
    os.sync()       # save_pretrained leaves its files in the page cache (no fsync); ours fsyncs every shard
    res.update(seconds=seconds, sync_s=time.perf_counter() - t0, out_bytes=out_bytes(out), disk=disk)
    return res


def agreement(ours: Path, peer: Path, names: list[str]) -> str:
    """Both outputs' fp8 codes: the share of equal bytes and the largest difference in e4m3 steps (adjacent codes);
    the peer stores a bf16 ``weight_scale``, ours a float32 ``weight_scale_inv``; and the largest difference of the
    dequantized weights relative to the block's largest magnitude."""
    import torch
    from safetensors import safe_open
    from megatron_fp8pb.quant.reference import dequantize_blockfp8

    def load(d: Path, name: str):
        idx = d / "model.safetensors.index.json"
        f = json.loads(idx.read_text())["weight_map"][name] if idx.exists() else "model.safetensors"
        with safe_open(str(d / f), "pt") as fh:
            return fh.get_tensor(name)
    equal, total, worst, steps = 0, 0, 0.0, 0
    for n in names:
        qa, sa = load(ours, n), load(ours, n[:-len("weight")] + "weight_scale_inv")
        qb, sb = load(peer, n), load(peer, n[:-len("weight")] + "weight_scale")
        equal += int((qa.view(torch.uint8) == qb.view(torch.uint8)).sum())
        total += qa.numel()
        def ordinal(q):
            c = q.view(torch.uint8).int()
            return torch.where(c >= 128, -(c - 128), c)
        steps = max(steps, int((ordinal(qa) - ordinal(qb)).abs().max()))
        da, db = dequantize_blockfp8(qa, sa).float(), dequantize_blockfp8(qb, sb.float()).float()
        amax = (sa * 448).repeat_interleave(128, 0).repeat_interleave(128, 1)[:qa.shape[0], :qa.shape[1]]
        worst = max(worst, float(((da - db).abs() / amax).max()))
    return f"{100 * equal / max(total, 1):.1f}% of fp8 bytes equal over {len(names)} tensors, at most {steps} e4m3 " \
           f"step(s) apart; dequantized, at most {worst:.4f} of the block amax apart"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="CPU, tp=2, llama-200m shapes, < 5 minutes")
    ap.add_argument("--gpu", action="store_true", help="one GPU, tp=1")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--layers", default=None, help="two depths, comma-separated: the RSS slope between them")
    ap.add_argument("--nproc", type=int, default=None)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="runs of ours at the deepest source (the median is shown)")
    ap.add_argument("--peer-repeats", type=int, default=1, help="runs of the peer (the median is shown)")
    ap.add_argument("--trace", action="store_true",
                    help="print what the disks did (MB/s read and written every 0.5 s) during each timed run")
    ap.add_argument("--megatron", action="store_true",
                    help="also save the deepest source as a Megatron dist checkpoint and export that (needs megatron-core)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    arch = args.arch or ("llama3-8b" if args.gpu else "llama-200m")
    nproc = args.nproc or (1 if args.gpu else 2)
    layers = [int(x) for x in (args.layers or ("4,32" if args.gpu else "4,12")).split(",")]
    extra = [f"parallel.tp={nproc}"] + ([] if args.gpu else ["parallel.device=cpu", "output.max_shard_size=200MB"])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fp8pb-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "e2e.log"
    runs = {}
    dropped = False
    for n in layers:
        src, out = work / f"src-{n}", work / f"ours-{n}"
        t0 = time.perf_counter()
        src_bytes = write_random_source(src, arch, n)
        print(f"{n} layers: source {src_bytes / 1e9:.2f} GB written in {time.perf_counter() - t0:.1f} s", flush=True)
        tries = []
        for _ in range(args.repeats if n == layers[-1] else 1):
            dropped = drop_caches(out)
            ours = run_ours(src, out, nproc, extra, log, trace=args.trace and n == layers[-1])
            _show(f"{n} layers: ours {ours['seconds']:.1f} s, peak RSS per rank "
                  f"{[round(r / 1e9, 2) for r in ours['rss']]} GB; {ours['phases']}; rank 0 {ours['marks']}", ours)
            tries.append(ours)
        ours = _median_run(tries)
        runs[n] = dict(src_bytes=src_bytes, ours=ours, seconds_each=[t["seconds"] for t in tries])
        if n != layers[-1]:
            shutil.rmtree(out)
            shutil.rmtree(src)
    n = layers[-1]
    src, out = work / f"src-{n}", work / f"ours-{n}"
    r = runs[n]
    drop_caches()
    rf = read_floor(src)
    drop_caches()
    wf = write_floor(work, r["ours"]["out_bytes"])
    floor = rf + wf
    drop_caches()
    sf = startup_floor(args.gpu)
    mg = None
    if args.megatron:
        ck = work / f"megatron-{n}"
        saved_s = save_megatron_checkpoint(src, ck, log)
        runs_m = []
        for _ in range(args.repeats):
            drop_caches(work / "ours-megatron")
            runs_m.append(run_ours(src, work / "ours-megatron", nproc, extra, log, [
                "source.kind=megatron", f"source.path={ck}", f"source.hf_config={src}/config.json"], trace=args.trace))
            _show(f"{n} layers, Megatron checkpoint: ours {runs_m[-1]['seconds']:.1f} s; {runs_m[-1]['phases']}; "
                  f"rank 0 {runs_m[-1]['marks']}", runs_m[-1])
        same = all((work / "ours-megatron" / f.name).read_bytes() == f.read_bytes() for f in out.glob("*.safetensors"))
        drop_caches()
        mg = dict(saved_s=saved_s, read_floor=read_floor(ck, "*.distcp"), same=same,
                  ours=_median_run(runs_m),
                  seconds_each=[t["seconds"] for t in runs_m])
    peer = None
    if not args.no_peer:
        peers = []
        for _ in range(args.peer_repeats):
            drop_caches(work / "peer")
            got = run_peer(src, work / "peer", work, log, trace=args.trace)
            if got is None:
                break
            _show(f"{n} layers: llm-compressor {got['seconds']:.1f} s", got)
            got["durable"] = got["seconds"] + got["sync_s"]
            peers.append(got)
        peer = _median_run(peers) if peers else None
        if peer:
            peer["seconds_each"] = [t["seconds"] for t in peers]
            peer["durable_each"] = [t["durable"] for t in peers]
            peer["durable_median"] = _median_run(peers, "durable")["durable"]
    import torch
    dev = torch.cuda.get_device_name(0) if args.gpu and torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\ne2e on {dev}: {arch} shapes, {n} layers, source {r['src_bytes'] / 1e9:.2f} GB, nproc={nproc}, page "
          f"cache {'dropped' if dropped else 'NOT dropped (not root)'}\n")
    print("| variant | seconds | x floor | peak RSS GB (max rank) | export added GB (max rank) | output GB |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| read floor | {rf:.2f} | | | | |")
    print(f"| write floor (fsync) | {wf:.2f} | | | | |")
    print(f"| read + write floor | {floor:.2f} | 1.00 | | | |")
    print(f"| start-up floor: cold `import torch`{' + CUDA context' if args.gpu else ''} | {sf:.2f} | | | | |")
    each = _runs_label(r["seconds_each"])
    print(f"| ours{each} | {r['ours']['seconds']:.2f} | {r['ours']['seconds'] / floor:.2f} | {max(r['ours']['rss']) / 1e9:.2f}"
          f" | {max(r['ours']['added']) / 1e9:.2f} | {r['ours']['out_bytes'] / 1e9:.2f} |")
    if peer:
        print(f"| llm-compressor FP8_BLOCK{_runs_label(peer['seconds_each'])} | {peer['seconds']:.2f} | {peer['seconds'] / floor:.2f} | "
              f"{peer['peak_rss_gb']:.2f} | | {peer['out_bytes'] / 1e9:.2f} |")
        durable = peer["durable_median"]
        print(f"| llm-compressor, then `sync` of the output it left in the page cache{_runs_label(peer['durable_each'])}"
              f" | {durable:.2f} | {durable / floor:.2f} | | | |")
        ours_mean = sum(r["seconds_each"]) / len(r["seconds_each"])
        peer_mean = sum(peer["seconds_each"]) / len(peer["seconds_each"])
        print(f"\npeer phases: imports {peer['imports_s']:.1f} s, load {peer['load_s']:.1f} s, quantize "
              f"{peer['quantize_s']:.1f} s, save {peer['save_s']:.1f} s (to the page cache; its sync took "
              f"{peer['sync_s']:.1f} s after)")
        print(f"ours vs peer: {peer['seconds'] / r['ours']['seconds']:.2f}x faster (medians), "
              f"{peer_mean / ours_mean:.2f}x (means), {min(peer['seconds_each']) / max(r['seconds_each']):.2f}x (our "
              f"slowest run against its fastest); against the peer with its output on disk: "
              f"{durable / r['ours']['seconds']:.2f}x (medians)")
        names = [f"model.layers.{i}.{m}.weight" for i in (0, n - 1) for m in ("self_attn.q_proj", "mlp.down_proj")]
        print("agreement: " + agreement(out, work / "peer", names))
    if mg:
        mfloor = mg["read_floor"] + wf
        each = _runs_label(mg["seconds_each"])
        print(f"\nFrom the same weights saved as a Megatron dist checkpoint (torch_dist, tp=1; saved in "
              f"{mg['saved_s']:.0f} s):\n")
        print("| variant | seconds | x floor | peak RSS GB (max rank) | export added GB (max rank) | output GB |")
        print("|---|---:|---:|---:|---:|---:|")
        print(f"| read floor (.distcp files) | {mg['read_floor']:.2f} | | | | |")
        print(f"| read + write floor | {mfloor:.2f} | 1.00 | | | |")
        print(f"| ours, source.kind=megatron{each} | {mg['ours']['seconds']:.2f} | {mg['ours']['seconds'] / mfloor:.2f} | "
              f"{max(mg['ours']['rss']) / 1e9:.2f} | {max(mg['ours']['added']) / 1e9:.2f} | "
              f"{mg['ours']['out_bytes'] / 1e9:.2f} |")
        print(f"\nfiles byte-identical to the HF source's export: {mg['same']}; ours over the read + write + start-up "
              f"floor: {mg['ours']['seconds'] / (mfloor + sf):.2f}x; phases: {mg['ours']['phases']}; rank 0 "
              f"{mg['ours']['marks']}")
    print(f"ours phases: {r['ours']['phases']}; rank 0 {r['ours']['marks']}")
    a, b = runs[layers[0]], runs[layers[-1]]
    slope = (max(b["ours"]["added"]) - max(a["ours"]["added"])) / max(b["src_bytes"] - a["src_bytes"], 1)
    print(f"ours over the read + write + start-up floor ({floor + sf:.2f} s): {r['ours']['seconds'] / (floor + sf):.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=dev, arch=arch, runs={str(k): v for k, v in runs.items()},
                                                    read_floor=rf, write_floor=wf, startup_floor=sf, peer=peer,
                                                    megatron=mg), indent=2))
    print(f"e2e_vs_floor={r['ours']['seconds'] / floor:.2f} peak_rss_slope={slope:.3f}")


if __name__ == "__main__":
    main()
