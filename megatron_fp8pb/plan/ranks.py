"""Ranks of a parallel layout without megatron-core, for a streamed source (no Megatron model exists, so any
consistent assignment exports the same bytes; this one follows Megatron's default order).

Dense parameters: ``rank = tp_rank + tp * (dp_rank + dp * pp_rank)``. Experts:
``rank = etp_rank + etp * (ep_rank + ep * (edp_rank + edp * pp_rank))``. The first data-parallel replica exports.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_fp8pb.plan.params import Layout


def pp_rank_of(rank: int, world: int, pp: int) -> int:
    """The pipeline stage of a global rank (each stage holds world / pp consecutive ranks)."""
    return rank // (world // pp)


def stage_layer_range(num_layers: int, pp: int, pp_rank: int) -> range:
    """Global decoder layers of a pipeline stage (Megatron's even split)."""
    per = num_layers // pp
    return range(pp_rank * per, (pp_rank + 1) * per)


def ep_rank_of(rank: int, ep: int, etp: int) -> int:
    """The expert-parallel rank of a global rank (experts: ``rank = etp_rank + etp * (ep_rank + ...)``)."""
    return (rank // etp) % ep


def rank_layout(rank: int, world: int, tp: int, pp: int, ep: int = 1, etp: int | None = None) -> Layout:
    from megatron_fp8pb.plan.params import Layout
    etp = etp or tp
    dp, edp = world // (tp * pp), world // (etp * ep * pp)
    tp_rank, rest = rank % tp, rank // tp
    dp_rank, pp_rank = rest % dp, pp_rank_of(rank, world, pp)
    etp_rank, ep_rank, rest = rank % etp, ep_rank_of(rank, ep, etp), rank // (etp * ep)
    edp_rank = rest % edp
    assert rest // edp == pp_rank, "tp*dp and etp*ep*edp blocks of one pipeline stage must coincide"
    return Layout(tp_size=tp, tp_rank=tp_rank, pp_size=pp, pp_rank=pp_rank, ep_size=ep, ep_rank=ep_rank,
                  etp_size=etp, etp_rank=etp_rank, exporting=dp_rank == 0, expert_exporting=edp_rank == 0)


def group_ranks(world: int, tp: int, pp: int, ep: int = 1, etp: int | None = None) -> dict[str, list[list[int]]]:
    """Every tensor-parallel and expert-tensor-parallel group of the world, as lists of global ranks."""
    etp = etp or tp
    return {"tp": [list(range(s, s + tp)) for s in range(0, world, tp)],
            "etp": [list(range(s, s + etp)) for s in range(0, world, etp)]}
