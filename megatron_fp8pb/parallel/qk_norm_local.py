"""A q/k RMSNorm over all heads at once (MiniMax-M2's ``q_norm`` [heads * head_dim], ``k_norm`` [kv_heads *
head_dim]) as a megatron-core module, split along heads with the attention.

megatron-core's SelfAttention builds ``q_layernorm`` / ``k_layernorm`` with ``hidden_size=head_dim`` and applies them
to query [s, b, local heads, head_dim] and key [s, b, local kv heads, head_dim] after ``linear_qkv``; its stock norms
normalize each head alone. ``FullWidthRMSNorm`` holds this rank's heads of the full-width weight and normalizes over
the full width: the sum of squares of the rank's heads is all-reduced over the tensor-parallel group, so every rank
computes what one process computes on the whole vector.

Query heads are split evenly (rank r holds heads ``[r * n / tp, (r + 1) * n / tp)``). Key heads follow megatron-core's
attention: with ``num_query_groups >= tp`` they are split the same way; with fewer (``tp % num_query_groups == 0``)
each rank holds one kv head, ``kv_head = tp_rank // (tp / num_query_groups)``, and ``tp / num_query_groups`` ranks hold
the same slice of the weight (saved once, the others as replicas). Only the first replica adds its sum of squares, so
the statistic counts each head once. In that case a training job must sum the weight's gradient over the replicas.
"""
from __future__ import annotations

import torch

QUERY, KEY = "query", "key"


def head_layout(which: str, num_heads: int, num_query_groups: int, tp_size: int) -> tuple[int, int, int]:
    """(heads this rank holds, distinct weight slices over the tensor-parallel group, ranks holding each slice).

    ``which``: "query" or "key". Raises ValueError showing the arithmetic of a split megatron-core cannot build."""
    n = num_heads if which == QUERY else num_query_groups
    name = "num_attention_heads" if which == QUERY else "num_query_groups"
    if which == KEY and n < tp_size:
        if tp_size % n:
            raise ValueError(f"full-width k norm: tp({tp_size}) % {name}({n}) = {tp_size % n} != 0; megatron-core "
                             f"replicates kv heads only where their number divides tp")
        return 1, n, tp_size // n
    if n % tp_size:
        raise ValueError(f"full-width {which} norm: {name}({n}) % tp({tp_size}) = {n % tp_size} != 0; each rank must "
                         f"hold whole heads")
    return n // tp_size, tp_size, 1


class FullWidthRMSNorm(torch.nn.Module):
    """RMSNorm over ``heads * head_dim`` whose weight is split along heads over tensor parallelism.

    ``weight`` [local heads * head_dim]; x [s, b, local heads, head_dim] -> the same shape, equal to HF's
    ``RMSNorm(heads * head_dim)`` of the whole vector restricted to this rank's heads (float32 statistic, then
    ``weight * x.to(input dtype)`` as transformers' RMSNorm). ``which``: "query" or "key"; ``hidden_size`` is the
    head dim megatron-core passes. ``tp_group``: default megatron-core's tensor-parallel group."""

    def __init__(self, hidden_size: int, config, eps: float = 1e-6, which: str = QUERY, tp_group=None):
        super().__init__()
        if which not in (QUERY, KEY):
            raise ValueError(f"FullWidthRMSNorm: which={which!r}; choose {QUERY!r} or {KEY!r}")
        if tp_group is None:
            from megatron.core import parallel_state
            tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_group = tp_group
        tp_size, tp_rank = torch.distributed.get_world_size(tp_group), torch.distributed.get_rank(tp_group)
        groups = config.num_query_groups or config.num_attention_heads
        local, self.shards, self.replicas = head_layout(which, config.num_attention_heads, groups, tp_size)
        self.shard_rank, self.replica_rank = tp_rank // self.replicas, tp_rank % self.replicas
        self.which, self.head_dim, self.eps = which, hidden_size, eps
        self.full_width = local * hidden_size * self.shards
        self.weight = torch.nn.Parameter(torch.ones(local * hidden_size, dtype=config.params_dtype))
        # what megatron-core's column-parallel layers set; the export reads the partitioning from them
        self.weight.tensor_model_parallel = self.replicas == 1
        self.weight.partition_dim = 0
        self.weight.partition_stride = 1
        self.weight.head_replicas = self.replicas

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        h = x.reshape(*shape[:-2], -1).float()
        ss = h.pow(2).sum(-1, keepdim=True)
        if self.shards > 1:
            if self.replica_rank:     # a replica of a slice another rank adds
                ss = torch.zeros_like(ss)
            from torch.distributed.nn.functional import all_reduce
            ss = all_reduce(ss, group=self.tp_group)
        h = h * torch.rsqrt(ss / self.full_width + self.eps)
        return (self.weight * h.to(dtype)).reshape(shape)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """The weight as one ShardedTensor: slice ``shard_rank`` of ``shards`` along dim 0, replica
        (0, ``replica_rank``, data-parallel rank)."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
        dp_rank = torch.distributed.get_rank(ensure_metadata_has_dp_cp_group(metadata)["dp_cp_group"])
        key, axis = f"{prefix}weight", len(sharded_offsets)
        return {key: ShardedTensor.from_rank_offsets(key, self.weight, *sharded_offsets,
                                                     (axis, self.shard_rank, self.shards),
                                                     replica_id=(0, self.replica_rank, dp_rank),
                                                     prepend_axis_num=axis)}

    def extra_repr(self) -> str:
        return f"{self.which}, {tuple(self.weight.shape)} of {self.full_width}, eps={self.eps}"


def full_width_qk_norms():
    """(q_layernorm, k_layernorm) ModuleSpecs of the full-width norm, for SelfAttention's submodules."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    return (ModuleSpec(module=FullWidthRMSNorm, params={"which": QUERY}),
            ModuleSpec(module=FullWidthRMSNorm, params={"which": KEY}))
