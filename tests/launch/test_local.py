"""launch/export_local.sh: one node, no Slurm, as many processes as the config's layout needs."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_export_local_picks_nproc_from_the_config(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, FP8PB_PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run(["bash", str(ROOT / "launch" / "export_local.sh"), "--config",
                        str(ROOT / "configs" / "tiny-qwen3-tp2.yaml"), "parallel.backend=gloo",
                        "parallel.device=cpu", f"output.dir={out}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "export_local: 2 process(es) on this node" in r.stderr
    assert "tp=2 pp=1 ep=1 on 2 rank(s)" in r.stdout
    v = subprocess.run([sys.executable, "-m", "megatron_fp8pb.verify", str(out)], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr

