"""Multi-node rendezvous without Slurm: two torchrun agents (--nnodes 2, one process each, c10d rendezvous on
127.0.0.1) write the same checkpoint, byte for byte, as one agent with two processes."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from helpers import free_port

ROOT = Path(__file__).resolve().parents[2]


def _cmd(extra, out):
    return [sys.executable, "-m", "torch.distributed.run", *extra, str(ROOT / "launch" / "export.py"),
            "parallel.tp=2", f"output.dir={out}", "output.max_shard_size=1MB"]


def _digests(out: Path) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())}


def test_two_nodes_equal_one_node(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    one = tmp_path / "one"
    r = subprocess.run(_cmd(["--nproc_per_node=2", f"--master_port={free_port()}"], one), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"
    port = free_port()
    rdzv = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
            "--rdzv_id=fp8pb-test"]
    procs = [subprocess.Popen(_cmd(rdzv + [f"--node_rank={k}"], two), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), results[0][1][-2000:] + results[1][1][-2000:]
    assert _digests(one) == _digests(two)
