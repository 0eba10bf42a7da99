"""The ``megatron-fp8pb-export`` command: starts the export's ranks on this node, or runs as one of them.

Under ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE`` and ``MASTER_ADDR``) the process is one rank.
Inside a Slurm step (``srun``) it is the rank Slurm numbers it, or with ``--nproc-per-node`` it starts that many ranks
of its node. Elsewhere it starts ``--nproc-per-node`` ranks itself (default: the fewest the layout needs), waits for
them, and exits with the code that tells what happened: 0 done, 2 refused (the ``error:`` line says why and what to
change), 130 interrupted, 1 anything else.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import subprocess
import sys
import time

PROG = "megatron-fp8pb-export"


def parser(full_help: bool = True) -> argparse.ArgumentParser:
    """The command's arguments; ``full_help`` adds the epilog of config keys and architectures, which imports the
    architecture registry (and torch), so it is built only when the help is asked for: the ranks start sooner."""
    epilog = None
    if full_help:
        from megatron_fp8pb.archs import registry
        from megatron_fp8pb.config import keys_help
        epilog = ("config keys (key=default, meaning); set them in the YAML file or as key=value:\n" + keys_help() +
                  "\n\narchitectures of an hf or megatron source (config.json's model_type): " + ", ".join(registry())
                  + "\n\nexit codes: 0 done, 2 refused (one error: line says why; FP8PB_DEBUG=1 adds the traceback), "
                  "130 interrupted, 1 anything else")
    ap = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a Megatron-core or HF model to a Hugging Face block-FP8 (W8A8) checkpoint.",
        epilog=epilog)
    ap.add_argument("--config", help="YAML file: a diff over the defaults")
    ap.add_argument("--nproc-per-node", type=int, default=None,
                    help="ranks to start on this node (default: the fewest the layout needs); ignored under torchrun")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. parallel.tp=2")
    return ap


def min_world(tp: int, pp: int, ep: int = 1, etp: int | None = None) -> int:
    """The smallest world size the layout fits: lcm(tp*pp, pp*ep*etp)."""
    return math.lcm(tp * pp, pp * ep * (etp or tp))


def under_launcher(env) -> bool:
    """Whether a launcher (torchrun, this command, a script) already made this process a rank."""
    return all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def _first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return nodelist.split(",")[0].split("[")[0]


def slurm_rank_env(env) -> dict | None:
    """The rank variables of a process that ``srun`` started as one rank of the job (one task per rank); None
    outside a Slurm step."""
    if "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return None
    ntasks = int(env.get("SLURM_NTASKS", "1"))
    master = env.get("MASTER_ADDR") or (_first_host(env["SLURM_JOB_NODELIST"]) if ntasks > 1 else "127.0.0.1")
    per_node = env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1")).split("(")[0].split(",")[0]
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": str(ntasks), "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": per_node, "MASTER_ADDR": master,
            "MASTER_PORT": env.get("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(n: int, argv: list[str], node_rank: int = 0, nodes: int = 1, master: str = "127.0.0.1",
                port: int | None = None) -> int:
    """Start ``n`` ranks of this node and wait for them; the exit code of the job.

    Ctrl-C reaches the ranks directly (they share the terminal's process group); each prints its own line. When a
    rank fails, the others get a few seconds to leave on their own, then SIGTERM, then SIGKILL."""
    env = dict(os.environ, MASTER_ADDR=master, MASTER_PORT=str(port or _free_port()), WORLD_SIZE=str(n * nodes),
               LOCAL_WORLD_SIZE=str(n))
    procs = [subprocess.Popen([sys.executable, "-m", "megatron_fp8pb.launcher", *argv],
                              env=dict(env, RANK=str(node_rank * n + i), LOCAL_RANK=str(i))) for i in range(n)]
    signal.signal(signal.SIGINT, lambda signum, frame: None)

    def stop(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, stop)
    failed_at = None
    while any(p.poll() is None for p in procs):
        time.sleep(0.1)
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > 5:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM if time.monotonic() - failed_at < 25 else signal.SIGKILL)
    codes = [p.returncode for p in procs]
    for special in (130, 2):
        if special in codes:
            return special
    return next((1 for c in codes if c), 0)


def run_rank(args: argparse.Namespace) -> int:
    """This process as one rank of the export: the source's readahead first, then the job."""
    from megatron_fp8pb import process
    process.handle_interrupts()
    process.end_with_launcher()
    from megatron_fp8pb.sources.readahead import start_for_command_line
    start_for_command_line(args.config, args.overrides)     # the disk reads the source while torch is imported
    from megatron_fp8pb.cli import run
    return process.cli(run, args.config, args.overrides)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    env = os.environ
    wants_help = any(a in ("-h", "--help") for a in argv)
    if under_launcher(env) and int(env.get("RANK", "0")) != 0 and wants_help:
        return 0      # the help is printed once, by rank 0
    args = parser(full_help=wants_help).parse_args(argv)
    if under_launcher(env):
        return run_rank(args)
    slurm = slurm_rank_env(env)
    if slurm is not None:
        nodes = int(env.get("SLURM_NNODES", "1"))
        if args.nproc_per_node and int(env.get("SLURM_NTASKS", "1")) == nodes:   # one task per node: start its ranks
            return start_ranks(args.nproc_per_node, argv, int(env.get("SLURM_NODEID", "0")), nodes,
                               slurm["MASTER_ADDR"], int(slurm["MASTER_PORT"]))
        os.environ.update(slurm)
        return run_rank(args)
    n = args.nproc_per_node
    if n is None:
        from megatron_fp8pb.config import load_config
        from megatron_fp8pb.errors import EXIT_REFUSED, debug, is_expected, message
        try:
            p = load_config(args.config, args.overrides).parallel
        except Exception as e:      # an unreadable config or a bad key: the one line
            if debug() or not is_expected(e):
                raise
            print(f"error: {message(e)}", file=sys.stderr, flush=True)
            return EXIT_REFUSED
        n = min_world(p.tp, p.pp, p.ep, p.etp)
    return start_ranks(n, argv)


def entry() -> None:
    """The console script: ``main``, then leave without the interpreter's teardown (the job closed its groups and
    files)."""
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    entry()
