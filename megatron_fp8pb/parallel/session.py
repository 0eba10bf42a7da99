"""Start and stop an export job's processes, the same way for every entry point: the command line (``run``), the
benchmark and the test workers start their own (``started``); the in-process API joins the process groups its
training job already has (``joined``)."""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_fp8pb.parallel import collectives as coll
from megatron_fp8pb.parallel import megatron as mcore
from megatron_fp8pb.config import ParallelConfig
from megatron_fp8pb.log import quiet_known_warnings
from megatron_fp8pb.plan.params import Layout


@dataclass
class Session:
    """What an export job needs from its processes: this rank and the world size, its place in the parallel layout,
    the groups the export's collectives use (``groups.device``: where tensors travel), whether the model lives on
    CUDA, and ``marks``: (step, seconds since the process started) of the startup."""
    rank: int
    world: int
    layout: Layout
    groups: mcore.Groups
    on_gpu: bool
    marks: list[tuple[str, float]] = field(default_factory=list)
    megatron: bool = True       # megatron-core's parallel state is initialized (the layout and groups are its)

    @property
    def device(self) -> torch.device:
        """Where the model lives: this rank's GPU, or the CPU."""
        return torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")


def joined(on_gpu: bool | None = None) -> Session:
    """The caller's initialized Megatron parallel state (the in-process API): nothing is started or torn down.
    ``on_gpu`` None: the model is taken to live where the collectives run (CUDA under NCCL)."""
    layout, groups = mcore.layout_and_groups()
    return Session(coll.rank(), coll.world_size(), layout, groups,
                   groups.device.type == "cuda" if on_gpu is None else on_gpu)


@contextlib.contextmanager
def started(parallel: ParallelConfig, *, megatron: bool = True, vp: int | None = None,
            agreed: bool = False) -> Iterator[Session]:
    """Start the job's process group from torchrun's environment (one process without it) and its parallel layout,
    yield the Session, and tear both down at the end, also when the job fails (a process group that was already up
    is left as found). After a job that ends normally, every rank passes a barrier first.

    ``parallel``: backend and device "auto" are resolved here (``ParallelConfig.resolved``); when the model or the
    backend uses CUDA, each rank's device is its local GPU. ``megatron`` False (a source that needs no Megatron
    model): the layout and its groups come without megatron-core. ``vp``: virtual-pipeline chunks per stage
    (interleaved schedule). ``agreed``: ``megatron`` is this rank's own answer (the command line's, from the source's
    files), and megatron-core is used wherever any rank needs it (imported then as the command line imports it)."""
    quiet_known_warnings()      # before megatron.core is imported
    p = parallel.resolved()
    owned = not coll.is_initialized()
    if owned:
        _start_process_group(p.backend, p.timeout_s, cuda=p.on_gpu)
    marks = [("process group", process_age())]
    try:
        if agreed:
            megatron = coll.any_true(megatron, coll.comm_device())
            if megatron:
                from megatron_fp8pb.parallel.megatron_import import import_without_compiling
                import_without_compiling()
        if megatron:
            mcore.initialize_parallel(p.tp, p.pp, p.ep, p.etp, vp=vp)
            session = joined(p.on_gpu)
        else:
            from megatron_fp8pb.plan.ranks import group_ranks, rank_layout
            rank, world = coll.rank(), coll.world_size()
            g = coll.new_groups(group_ranks(world, p.tp, p.pp, p.ep, p.etp))
            session = Session(rank, world, rank_layout(rank, world, p.tp, p.pp, p.ep, p.etp),
                              mcore.Groups(g.get("tp"), g.get("etp"), coll.comm_device()), p.on_gpu,
                              megatron=False)
        session.marks = marks + [("parallel state", process_age())]
        yield session
        coll.barrier()
    finally:
        if owned:
            if megatron:
                mcore.destroy_parallel()
            dist.destroy_process_group()


def _start_process_group(backend: str, timeout_s: float, cuda: bool) -> None:
    """The default process group from torchrun's environment (a single process when absent). ``cuda``: the model
    lives on CUDA (under NCCL the collectives do too): this rank's device is its local GPU."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(29500 + os.getpid() % 1000)))
    if cuda or backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if cuda:
        from megatron_fp8pb.quant import triton_kernel as blockfp8_triton
        blockfp8_triton.warm_up(torch.device("cuda", torch.cuda.current_device()))     # while the group starts
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def process_age() -> float:
    """Seconds since this process started (Linux /proc), so that interpreter start and imports are counted."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0
