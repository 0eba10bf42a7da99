"""The export's collectives: amax all-reduce, piece transfer to the writers, object exchange. The other modules that
touch torch.distributed: ``session`` (starts and destroys the process group of a job), ``mcore`` (megatron-core's
parallel state, dist checkpoints) and ``errors`` (a refused job with a process group still up leaves without its
teardown).

Every function takes its process group explicitly. Tensors travel as uint8 views so fp8 and bf16 need no backend
dtype support; with NCCL they travel through ``device``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_fp8pb.errors import Refusal


@dataclass
class Traffic:
    """Bytes this rank moved between ranks, by kind."""
    p2p_sent: int = 0
    p2p_received: int = 0
    allreduce: int = 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def comm_device() -> torch.device:
    """Where tensors go through collectives: this rank's GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def group_size(group) -> int:
    return dist.get_world_size(group) if is_initialized() and group is not None else 1


def allreduce_amax(grids: list[torch.Tensor], group, traffic: Traffic, device: torch.device) -> list[torch.Tensor]:
    """MAX-all-reduce a list of float32 amax grids in one flat buffer inside ``group``; returns the global grids."""
    if not grids or group_size(group) == 1:
        return grids
    flat = torch.cat([g.reshape(-1) for g in grids]).to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
    traffic.allreduce += flat.numel() * 4
    parts = flat.to(grids[0].device).split([g.numel() for g in grids])
    return [p.view(g.shape) for p, g in zip(parts, grids)]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def send_tensor(t: torch.Tensor, dst: int, traffic: Traffic, device: torch.device) -> None:
    buf = _bytes(t).to(device)
    dist.send(buf, dst=dst)
    traffic.p2p_sent += buf.numel()


def isend_tensor(t: torch.Tensor, dst: int, traffic: Traffic, device: torch.device) -> tuple:
    """Start sending a tensor (received with recv_tensor); returns what ``wait_sends`` waits for."""
    buf = _bytes(t).to(device)
    work = dist.isend(buf, dst=dst)
    traffic.p2p_sent += buf.numel()
    return work, buf


def wait_sends(pending: list[tuple]) -> None:
    for work, _ in pending:
        work.wait()


def recv_tensor(shape: tuple[int, ...], dtype: torch.dtype, src: int, traffic: Traffic,
                device: torch.device) -> torch.Tensor:
    """Receive a tensor sent with send_tensor; it stays on ``device``."""
    n = 1
    for s in shape:
        n *= s
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dist.recv(buf, src=src)
    traffic.p2p_received += nbytes
    return buf.view(dtype).reshape(shape)


def _solo() -> bool:
    """No other rank to talk to: no group, or a group of one (whose first collective would still start a
    communicator, NCCL's taking a fraction of a second)."""
    return not is_initialized() or dist.get_world_size() == 1


def gather_objects(obj, dst: int = 0) -> list | None:
    """Every rank's ``obj`` on ``dst`` (a list by rank), None elsewhere."""
    if _solo():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` on every rank (a list by rank)."""
    if _solo():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def scatter_objects(objs: list | None, src: int = 0):
    """``objs[r]`` (given on ``src``, a list by rank) on each rank ``r``."""
    if _solo():
        return objs[0]
    box = [None]
    dist.scatter_object_list(box, objs if dist.get_rank() == src else None, src=src)
    return box[0]


def broadcast_object(obj, src: int = 0):
    if _solo():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if not _solo():
        dist.barrier()


def any_true(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank (one MAX all-reduce of one int over the world)."""
    if _solo():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def new_groups(ranks_by_axis: dict[str, list[list[int]]], backend: str | None = None) -> dict[str, object]:
    """Create every group listed (all ranks call this with the same lists) -> this rank's group per axis."""
    me, mine = rank(), {}
    for axis, lists in ranks_by_axis.items():
        for ranks in lists:
            g = dist.new_group(ranks, backend=backend) if is_initialized() and len(ranks) > 1 else None
            if me in ranks:
                mine[axis] = g
    return mine


def agree(error: str | None, name_rank: bool = True, cause: BaseException | None = None) -> None:
    """Collective: every rank learns whether any rank failed a check, and all raise the first failure (naming its
    rank unless ``name_rank`` is false) as an everywhere-Refusal. ``error``: this rank's message, or None; ``cause``:
    this rank's exception, chained (``from``) to the Refusal so that ``FP8PB_DEBUG=1`` shows where it arose."""
    errors = gather_objects(error)
    first = None
    if errors is not None:
        bad = [(r, e) for r, e in enumerate(errors) if e]
        if bad:
            r, msg = bad[0]
            plain = not name_rank or msg.startswith("rank ") or world_size() == 1
            first = msg if plain else f"rank {r}: {msg}"
    first = broadcast_object(first)
    if first:
        raise Refusal(first, everywhere=True) from cause
