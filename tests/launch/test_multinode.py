"""Multi-node rendezvous without Slurm, two torchrun agents on 127.0.0.1 (--nnodes 2, one process each):
the same checkpoint, byte for byte, as one agent with two processes; the second node never touches the output."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port, launch_nodes, output_digests, private_mounts_reason

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _cmd(launch: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launch, str(ROOT / "launch" / "export.py"),
            "parallel.tp=2", "parallel.backend=gloo", "parallel.device=cpu", f"output.dir={out}",
            "output.max_shard_size=1MB"]




def _run_nodes(cmds: list[list[str]]) -> None:
    results = launch_nodes(cmds)
    logs = "".join(f"\n--- node {k} (rc {rc})\n{err[-2000:]}" for k, (rc, _, err) in enumerate(results))
    assert all(rc == 0 for rc, _, _ in results), logs


def test_two_nodes_equal_one_node(tmp_path):
    one = tmp_path / "one"
    r = subprocess.run(_cmd(["--nproc_per_node=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}"],
                            one), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"
    rdzv = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}",
            "--rdzv_id=fp8pb-test"]
    _run_nodes([_cmd(rdzv + [f"--node_rank={k}"], two) for k in (0, 1)])
    assert len(output_digests(one)) > 3
    assert output_digests(one) == output_digests(two)


def test_second_node_needs_no_output_filesystem(tmp_path):
    """Node 1 sees the output's parent as an empty read-only directory of its own (a private tmpfs)."""
    reason = private_mounts_reason()
    if reason:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    shared = tmp_path / "shared"
    shared.mkdir()
    out = shared / "out"
    port = free_port()
    static = ["--nnodes=2", "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}"]
    node0 = _cmd(static + ["--node_rank=0"], out)
    node1 = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f'mount -t tmpfs -o ro tmpfs "{shared}" && exec "$0" "$@"', *_cmd(static + ["--node_rank=1"], out)]
    _run_nodes([node0, node1])
    v = subprocess.run([sys.executable, "-m", "megatron_fp8pb.verify", str(out)], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
