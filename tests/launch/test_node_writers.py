"""output.writers=node: two torchrun agents on 127.0.0.1 (--nnodes 2, static rendezvous) play two nodes sharing the
output filesystem. Each node's first rank writes the tensors its node's ranks hold into the one set of shard files:
every file is byte-identical to the one-writer export, node 1's writer wrote a share of the bytes, and a writer that
fails on node 1 leaves no output directory and one error line. The one-node exports run from one torchrun launch
(tests/jobs.py), each in processes of its own."""
import re
import sys
from pathlib import Path

import pytest

from helpers import free_port, launch_nodes, output_digests, private_mounts_reason
from jobs import Job, run_jobs, selected_jobs

ROOT = Path(__file__).resolve().parents[2]
BASE = ["parallel.backend=gloo", "parallel.device=cpu", "output.max_shard_size=1MB", "output.verify=false"]
# (processes per node, layout): pp across the nodes; tp inside each node and pp across them; a tp group across
# the nodes (node 1's writer sends its dense halves to node 0's) while node 1 writes its experts whole; a Megatron
# model built in each process (the tiny source is streamed from HF tensors, the random one is not)
LAYOUTS = {"pp2": (1, ["parallel.pp=2"]),
           "tp2-pp2": (2, ["parallel.tp=2", "parallel.pp=2"]),
           "moe-tp2-ep2": (1, ["source.arch=qwen3_moe", "parallel.tp=2", "parallel.ep=2", "parallel.etp=1"]),
           "built-model-tp2-pp2": (2, ["source.kind=random", "parallel.tp=2", "parallel.pp=2"])}


JOBS = {**{f"test_node_writers_equal_one_writer[{name}]": Job(2 * nproc, [*BASE, *layout])     # one writer
           for name, (nproc, layout) in LAYOUTS.items()},
        "test_one_node_is_one_writer": Job(2, [*BASE, "parallel.pp=2", "output.writers=node"])}


@pytest.fixture(scope="module")
def one_node(request, tmp_path_factory):
    return run_jobs(tmp_path_factory.mktemp("one-node"), selected_jobs(request, JOBS))


def _two_nodes(out: Path, nproc: int, args: list[str], env: dict | None = None,
               node1_prefix: tuple = ()) -> list[tuple[int, str, str]]:
    port = free_port()
    return launch_nodes([[*(node1_prefix if k else ()), sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                          f"--nproc_per_node={nproc}", f"--node_rank={k}", "--master_addr=127.0.0.1",
                          f"--master_port={port}", str(ROOT / "launch" / "export.py"), *BASE, *args,
                          f"output.dir={out}", "output.writers=node"] for k in (0, 1)], env=env)


def _errors(results) -> list[str]:
    return [line for _, o, e in results for line in (o + e).splitlines() if line.startswith("error:")]




def _written_by_rank(stdout: str) -> dict[int, float]:
    line = re.search(r"GB written by each writer rank[^:]*\): (.*)", stdout)
    assert line, stdout[-3000:]
    return {int(r): float(gb) for r, gb in re.findall(r"rank (\d+) ([\d.]+)", line.group(1))}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_node_writers_equal_one_writer(one_node, request, tmp_path, name):
    nproc, layout = LAYOUTS[name]
    r = one_node[request.node.name]
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = r.out, tmp_path / "two"
    results = _two_nodes(two, nproc, layout)
    assert all(rc == 0 for rc, _, _ in results), "".join(f"\n--- node {k} (rc {rc})\n{err[-2000:]}"
                                                         for k, (rc, _, err) in enumerate(results))
    assert len(output_digests(one)) > 3
    assert output_digests(one) == output_digests(two)
    by_rank = _written_by_rank(results[0][1])
    assert sorted(by_rank) == [0, nproc]       # the first rank of each node
    assert by_rank[nproc] > 0
    data = sum(f.stat().st_size for f in one.glob("*.safetensors"))
    assert 0 < data - sum(by_rank.values()) * 1e9 < 20_000 * len(list(one.glob("*.safetensors")))   # headers only
    assert not two.with_name("two.partial").exists()


def test_writer_failure_on_node_1_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    results = _two_nodes(out, 1, ["parallel.pp=2"], env={"FP8PB_INJECT_FAULT": "1:write:enospc"})
    assert all(rc != 0 for rc, _, _ in results)
    assert _errors(results) == ["error: rank 1, stage write: OSError: [Errno 28] No space left on device (injected)"], \
        "".join(e[-2000:] for _, _, e in results)
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_one_node_is_one_writer(one_node, request):
    """writers=node on a single node: rank 0 writes everything, as with the default."""
    r = one_node[request.node.name]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "GB written by each writer rank" not in r.stdout
    assert (r.out / "model.safetensors.index.json").exists()


def test_output_not_shared_with_node_1_is_refused(tmp_path):
    """Node 1 sees the output's parent as an empty read-only directory of its own (a private tmpfs)."""
    reason = private_mounts_reason()
    if reason:
        pytest.skip(reason)
    shared = tmp_path / "shared"
    shared.mkdir()
    out = shared / "out"
    results = _two_nodes(out, 1, ["parallel.pp=2"], node1_prefix=(
        "unshare", "--mount", "--propagation", "private", "sh", "-c",
        f'mount -t tmpfs -o ro tmpfs "{shared}" && exec "$0" "$@"'))
    assert all(rc != 0 for rc, _, _ in results)
    errors = _errors(results)
    assert len(errors) == 1 and errors[0].startswith("error: rank 1, stage write: ") and errors[0].endswith(
        "is not visible here; output.writers=node needs output.dir on a filesystem that every node shares (or use "
        "output.writers=rank0)"), errors
    assert not out.exists() and not out.with_name("out.partial").exists()
