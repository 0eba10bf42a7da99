"""torchrun worker for tests: several command-line exports in one launch (``tests/jobs.py`` writes the list).

Each job is what ``torchrun --nproc_per_node=W launch/export.py ARGS`` runs, in processes that are already up: the
first W ranks of the launch start a gloo process group of their own (world W, on a prefix of the launch's store),
set RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE as torchrun would for W processes, call launch/export.py's
``main(ARGS)`` with this rank's stdout and stderr going to the job's files, and tear the group (and any Megatron
parallel state) down again; the other ranks wait. After each job every rank of the launch meets at a store barrier.
Each rank records its exit code in ``rank<r>.json`` of the job's directory."""
import contextlib
import datetime
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch.distributed as dist  # noqa: E402

_spec = importlib.util.spec_from_file_location("launch_export", ROOT / "launch" / "export.py")
launch_export = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch_export)

WAIT = datetime.timedelta(seconds=900)      # the longest a rank waits for the jobs it takes no part in
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@contextlib.contextmanager
def redirected(out: Path, err: Path):
    """File descriptors 1 and 2 (Python's and native code's output alike) into ``out`` and ``err``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(out, "w") as o, open(err, "w") as e:
        os.dup2(o.fileno(), 1)
        os.dup2(e.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


@contextlib.contextmanager
def job_environment(rank: int, world: int, env: dict):
    saved = {k: os.environ.get(k) for k in (*ENV_KEYS, *env)}
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), **env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _teardown() -> None:
    if "megatron.core.parallel_state" in sys.modules:
        from megatron.core import parallel_state
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def run_job(index: int, job: dict, rank: int, store) -> int:
    """This rank's part of one job: its exit code (as the process's would be)."""
    world = job["world"]
    d = Path(job["dir"])
    with job_environment(rank, world, job.get("env", {})), redirected(d / f"rank{rank}.stdout",
                                                                       d / f"rank{rank}.stderr"):
        try:
            dist.init_process_group("gloo", store=dist.PrefixStore(f"job{index}/", store), rank=rank,
                                    world_size=world, timeout=datetime.timedelta(seconds=300))
            code = launch_export.main(job["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            _teardown()
    return code


def barrier(store, name: str, world: int) -> None:
    if store.add(name, 1) == world:
        store.set(name + "/done", "1")
    store.wait([name + "/done"], WAIT)


def main(spec: str) -> None:
    jobs = json.loads(Path(spec).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=WAIT)
    for i, job in enumerate(jobs):
        if rank < job["world"]:
            t0 = time.time()
            code = run_job(i, job, rank, store)
            (Path(job["dir"]) / f"rank{rank}.json").write_text(
                json.dumps({"returncode": code, "seconds": time.time() - t0}))
        barrier(store, f"after-job{i}", world)


if __name__ == "__main__":
    main(sys.argv[1])
