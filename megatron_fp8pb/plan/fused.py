"""Split and merge of Megatron's fused tensors into their HF tensors, both directions, pure.

linear_qkv rows are laid out per query group: ``[q heads of the group (heads_per_group*head_dim), k (head_dim),
v (head_dim)]``, groups in order; a TP shard holds whole groups. Gated linear_fc1 holds ``[gate; up]`` per rank.
Both work on weights [rows, K] and on biases [rows].
"""
from __future__ import annotations

import torch


def split_qkv(local: torch.Tensor, num_groups: int, heads_per_group: int,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """local [num_groups*(heads_per_group+2)*head_dim, ...] -> q [num_groups*heads_per_group*head_dim, ...],
    k [num_groups*head_dim, ...], v [num_groups*head_dim, ...] (contiguous copies)."""
    rest = tuple(local.shape[1:])
    want = num_groups * (heads_per_group + 2) * head_dim
    if local.shape[0] != want:
        raise ValueError(f"linear_qkv shard has {local.shape[0]} rows, expected num_query_groups_per_rank({num_groups})"
                         f" * (heads_per_group({heads_per_group}) + 2) * head_dim({head_dim}) = {want}")
    g = local.reshape(num_groups, heads_per_group + 2, head_dim, *rest)
    q = g[:, :heads_per_group].reshape(num_groups * heads_per_group * head_dim, *rest).contiguous()
    k = g[:, heads_per_group].reshape(num_groups * head_dim, *rest).contiguous()
    v = g[:, heads_per_group + 1].reshape(num_groups * head_dim, *rest).contiguous()
    return q, k, v


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_groups: int, heads_per_group: int,
              head_dim: int) -> torch.Tensor:
    """Inverse of split_qkv: q/k/v rows of some whole query groups -> fused linear_qkv rows."""
    rest = tuple(q.shape[1:])
    qg = q.reshape(num_groups, heads_per_group, head_dim, *rest)
    kg = k.reshape(num_groups, 1, head_dim, *rest)
    vg = v.reshape(num_groups, 1, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(num_groups * (heads_per_group + 2) * head_dim, *rest)


def split_gated(local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """local [2*F_local, ...] = [gate; up] -> gate [F_local, ...], up [F_local, ...]."""
    if local.shape[0] % 2:
        raise ValueError(f"gated linear_fc1 shard has an odd row count {local.shape[0]}; expected [gate; up]")
    gate, up = local.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def merge_gated(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Inverse of split_gated."""
    return torch.cat([gate, up], dim=0)
