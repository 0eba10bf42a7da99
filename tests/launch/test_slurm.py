"""launch/export.sbatch on a real Slurm cluster: the tiny model at tp=2 over two nodes, gloo on CPU, checked with
the verify command. Skipped, with the reason, where no cluster of two idle nodes answers; .ci/slurm_setup.sh starts
one on this machine (SLURM_CONF picks a cluster other than the system one)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cluster_reason() -> str | None:
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return "sbatch/sinfo not on PATH (bash .ci/slurm_setup.sh installs and starts a two-node local cluster)"
    r = subprocess.run(["sinfo", "-h", "-o", "%D %t"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return f"sinfo failed, no cluster answers: {r.stderr.strip()} (bash .ci/slurm_setup.sh starts one)"
    idle = sum(int(n) for n, state in (line.split() for line in r.stdout.splitlines()) if state in ("idle", "mix"))
    return None if idle >= 2 else f"fewer than 2 idle Slurm nodes: {r.stdout.strip()!r}"


@pytest.fixture(scope="module")
def cluster():
    reason = _cluster_reason()
    if reason:
        print(f"skipping the Slurm tests: {reason}")
        pytest.skip(reason)


def _sbatch(tmp_path: Path, rdzv: str) -> tuple[Path, Path]:
    out, logs, job_out = tmp_path / "out", tmp_path / "logs", tmp_path / "job.out"
    env = dict(os.environ, FP8PB_NPROC_PER_NODE="1", FP8PB_PYTHON=sys.executable, FP8PB_REPO=str(ROOT),
               FP8PB_LOG_DIR=str(logs), FP8PB_RDZV=rdzv)
    cmd = ["sbatch", "--wait", "--nodes=2", "--time=5", f"--output={job_out}", str(ROOT / "launch" / "export.sbatch"),
           "parallel.tp=2", "parallel.backend=gloo", "parallel.device=cpu", f"output.dir={out}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    tail = "".join(f"\n--- {p.name}\n" + p.read_text()[-3000:] for p in [job_out, *sorted(logs.glob("node-*.log"))]
                   if p.is_file())
    assert r.returncode == 0, r.stdout + r.stderr + tail
    v = subprocess.run([sys.executable, "-m", "megatron_fp8pb.verify", str(out)], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
    return logs, job_out


def _rank_logs(logs: Path, node: int) -> list[Path]:
    return sorted((logs / f"node-{node}").glob("*/attempt_0/0/stdout.log"))


def test_sbatch_two_nodes_c10d(cluster, tmp_path):
    logs, job_out = _sbatch(tmp_path, "c10d")
    assert "2 node(s) x 1 process(es), c10d rendezvous" in job_out.read_text()
    for node in (0, 1):
        assert (logs / f"node-{node}.log").is_file()
        assert _rank_logs(logs, node), f"no per-rank log under {logs}/node-{node}"
    writers = [n for n in (0, 1) if "[fp8pb] wrote " in (logs / f"node-{n}.log").read_text()]
    assert len(writers) == 1, f"exactly one node holds global rank 0, the writer: {writers}"


def test_sbatch_static_rank0_on_first_node(cluster, tmp_path):
    logs, _ = _sbatch(tmp_path, "static")
    assert "[fp8pb] wrote " in (logs / "node-0.log").read_text()
    assert "[fp8pb] wrote " not in (logs / "node-1.log").read_text()
