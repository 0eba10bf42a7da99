"""launch/export.sbatch on a real Slurm cluster (two nodes, gloo on CPU); skipped where no cluster answers.

CI starts a one-machine, two-node cluster with .ci/slurm_setup.sh before the tests."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cluster_reason() -> str | None:
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return "sbatch/sinfo not on PATH (run .ci/slurm_setup.sh to start a local cluster)"
    r = subprocess.run(["sinfo", "-h", "-o", "%D %t"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"sinfo failed: {r.stderr.strip()}"
    idle = sum(int(line.split()[0]) for line in r.stdout.splitlines() if line.split()[1] in ("idle", "mix"))
    return None if idle >= 2 else f"fewer than 2 idle Slurm nodes: {r.stdout.strip()!r}"


def test_sbatch_two_nodes(tmp_path):
    reason = _cluster_reason()
    if reason:
        print(f"skipping the Slurm test: {reason}")
        pytest.skip(reason)
    out = tmp_path / "out"
    env = dict(os.environ, FP8PB_NPROC_PER_NODE="1", FP8PB_PYTHON=sys.executable, FP8PB_REPO=str(ROOT),
               FP8PB_LOG_DIR=str(tmp_path / "logs"))
    r = subprocess.run(["sbatch", "--wait", "--nodes=2", f"--output={tmp_path}/job.out", str(ROOT / "launch" /
                        "export.sbatch"), "parallel.tp=2", "parallel.backend=gloo", "parallel.device=cpu",
                        f"output.dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert r.returncode == 0, r.stdout + r.stderr + log[-3000:]
    v = subprocess.run([sys.executable, "-m", "megatron_fp8pb.verify", str(out)], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
