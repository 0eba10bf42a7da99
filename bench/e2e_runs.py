"""The runs and floors of the end-to-end benchmarks (bench/e2e.py, bench/e2e_depths.py): writing a random source,
running ours and the peer as subprocesses, the read and write floors, the page cache."""
from __future__ import annotations

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


LAUNCHERS = ("command", "torchrun", "python")


def run_ours(src: Path, out: Path, nproc: int, extra: list[str], log: Path, source: list[str] | None = None,
             trace: bool = False, launcher: str | None = None) -> dict:
    """``source``: the source keys (default: the HF checkpoint ``src``). ``trace``: record the disks' activity.
    ``launcher``: ``command`` (``megatron-fp8pb-export``, as the README's first command runs it: it starts the ranks
    itself), ``torchrun`` (``torchrun --nproc_per_node=N launch/export.py``), or ``python`` (``launch/export.py``
    without a launcher, one process only; the default for one rank, torchrun for more)."""
    launcher = launcher or ("python" if nproc == 1 else "torchrun")
    if launcher not in LAUNCHERS or (launcher == "python" and nproc != 1):
        raise ValueError(f"launcher={launcher!r} with {nproc} ranks: choose one of {LAUNCHERS} (python: one rank)")
    entry = {"command": ["-m", "megatron_fp8pb.launcher", f"--nproc-per-node={nproc}"],
             "torchrun": ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_port()}",
                          str(ROOT / "launch" / "export.py")],
             "python": [str(ROOT / "launch" / "export.py")]}[launcher]
    source = source or ["source.kind=hf", f"source.path={src}"]
    cmd = [sys.executable, *entry, *source, f"output.dir={out}", "output.verify=false", "output.overwrite=true",
           *extra]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
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


