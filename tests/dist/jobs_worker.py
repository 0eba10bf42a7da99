"""torchrun worker for tests: several jobs (command-line exports, mostly) in one launch (``tests/jobs.py`` writes the
list).

Each job is what ``torchrun --nproc_per_node=W SCRIPT ARGS`` runs, without starting Python, torch and
transformers again: each of the first W ranks of the launch forks a process (which has those imports already), and
that process gets the environment torchrun gives W processes (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, and a
MASTER_PORT of the job's own, where its rank 0 serves the rendezvous store as without an agent store) and calls
SCRIPT as ``__main__`` with ARGS, its stdout and stderr going to the job's files: the export starts and tears down
its own process group, as on the command line. Its exit code (negative: the signal that ended it) goes to
``rank<r>.json`` there. A job that refuses, fails or is killed ends only its own processes. The other ranks wait;
after each job every rank of the launch meets at a store barrier. A launch rank then imports what its job process
imported (the export's own modules, transformers' model classes), so that only the first job pays for them."""
import contextlib
import datetime
import importlib
import json
import os
import runpy
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch.distributed as dist  # noqa: E402

from helpers import free_port  # noqa: E402

WAIT = datetime.timedelta(seconds=900)      # the longest a rank waits for the jobs it takes no part in
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_USE_AGENT_STORE")


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
def job_environment(rank: int, world: int, port: int, env: dict):
    saved = {k: os.environ.get(k) for k in (*ENV_KEYS, *env)}
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_job(job: dict, rank: int, port: int) -> int:
    """This rank's process of one job, forked: its exit code."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = _job_process(job, rank, port)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    import_like(Path(job["dir"]) / f"rank{rank}.imported")
    return os.waitstatus_to_exitcode(status)


def import_like(listing: Path) -> None:
    """Import here, in the order listed, the modules a job's process imported, so that the next job's processes
    start with them (a module that does not import on its own is left out)."""
    if not listing.exists():
        return
    for name in listing.read_text().split():
        if name not in sys.modules and not name.startswith("__"):
            try:
                importlib.import_module(name)
            except Exception:
                pass


def _job_process(job: dict, rank: int, port: int) -> int:
    before = set(sys.modules)
    d = Path(job["dir"])
    with job_environment(rank, job["world"], port, job.get("env", {})), redirected(d / f"rank{rank}.stdout",
                                                                                    d / f"rank{rank}.stderr"):
        script = str(ROOT / job["script"])
        sys.argv = [script, *job["argv"]]
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    (d / f"rank{rank}.imported").write_text("\n".join(m for m in sys.modules if m not in before))
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
        if rank == 0:
            store.set(f"job{i}/port", str(free_port()))
        if rank < job["world"]:
            t0 = time.time()
            code = run_job(job, rank, int(store.get(f"job{i}/port")))
            (Path(job["dir"]) / f"rank{rank}.json").write_text(
                json.dumps({"returncode": code, "seconds": time.time() - t0}))
        barrier(store, f"after-job{i}", world)


if __name__ == "__main__":
    main(sys.argv[1])
