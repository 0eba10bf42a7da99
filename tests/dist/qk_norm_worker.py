"""torchrun worker: the full-width q/k norm (``FullWidthRMSNorm``) at tp = world size, its forward against transformers'
RMSNorm of the whole vector on one process, its gradient against the same, and its sharded state dict's place in the
full weight. Prints one ``NORM`` JSON line per case from rank 0."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_fp8pb.config import ParallelConfig  # noqa: E402
from megatron_fp8pb.parallel import session  # noqa: E402
from megatron_fp8pb.parallel.qk_norm_local import FullWidthRMSNorm  # noqa: E402


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' MiniMaxM2RMSNorm of [s, b, heads * head_dim]."""
    from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2RMSNorm
    norm = MiniMaxM2RMSNorm(weight.numel(), eps)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm(x)


def case(which: str, heads: int, kv: int, head_dim: int, tp: int, rank: int) -> dict:
    n = heads if which == "query" else kv
    cfg = SimpleNamespace(num_attention_heads=heads, num_query_groups=kv, params_dtype=torch.float32)
    norm = FullWidthRMSNorm(head_dim, cfg, eps=1e-6, which=which)
    gen = torch.Generator().manual_seed(7)
    full_x = torch.randn(5, 3, n, head_dim, generator=gen) * 3
    full_w = torch.randn(n * head_dim, generator=gen)
    local_heads = norm.weight.numel() // head_dim
    replicas = tp // kv if which == "key" and kv < tp else 1

    def first_head(r: int) -> int:
        return r // replicas if replicas > 1 else r * local_heads
    first = first_head(rank)
    x = full_x[:, :, first:first + local_heads].clone().requires_grad_(True)
    with torch.no_grad():
        norm.weight.copy_(full_w[first * head_dim:(first + local_heads) * head_dim])
    out = norm(x)
    out.pow(2).sum().backward()     # each rank's loss over its heads; the job's loss is their sum
    grads = [torch.empty_like(x.grad) for _ in range(tp)]
    dist.all_gather(grads, x.grad)
    grad = sum(g for r, g in enumerate(grads) if first_head(r) == first)    # over the ranks holding these heads
    fx = full_x.reshape(5, 3, -1).clone().requires_grad_(True)
    want = reference(fx, full_w, 1e-6)
    (want.pow(2).sum() * replicas).backward()
    want_grad = fx.grad.reshape(5, 3, n, head_dim)[:, :, first:first + local_heads]
    lo, hi = first * head_dim, (first + local_heads) * head_dim
    st = norm.sharded_state_dict(prefix="attn.")["attn.weight"]
    return dict(which=which, heads=heads, kv=kv, rank=rank,
                out_err=float((out.detach() - want.detach()[..., lo:hi].reshape(out.shape)).abs().max()),
                grad_err=float((grad - want_grad).abs().max()), local=list(norm.weight.shape),
                global_shape=list(st.global_shape), global_offset=list(st.global_offset),
                replica_id=list(st.replica_id), style=bool(norm.weight.tensor_model_parallel))


def main() -> None:
    import os
    tp = int(os.environ["WORLD_SIZE"])
    with session.started(ParallelConfig(tp=tp, backend="gloo", device="cpu", timeout_s=60)):
        rank = dist.get_rank()
        rows = [case(which, heads, kv, 80, tp, rank)
                for which, heads, kv in (("query", 4, 2), ("key", 4, 2), ("key", 4, 1), ("query", 4, 1))]
        gathered = [None] * tp
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            for r in (x for rows in gathered for x in rows):
                print("NORM " + json.dumps(r))


if __name__ == "__main__":
    main()
