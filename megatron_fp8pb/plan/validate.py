"""Checks of a parallel layout against a model's dimensions, before any weight is touched."""
from __future__ import annotations

from megatron_fp8pb.archs.base import Dims


def check_layout(d: Dims, world: int, tp: int, pp: int, ep: int = 1, etp: int | None = None) -> int:
    """Return the data-parallel size; raise ValueError showing the arithmetic of the first impossible split."""
    etp = etp or tp
    errs = []
    for name, v in (("parallel.tp", tp), ("parallel.pp", pp), ("parallel.ep", ep), ("parallel.etp", etp)):
        if v < 1:
            errs.append(f"{name}={v} must be >= 1")
    if errs:
        raise ValueError("; ".join(errs))
    if world % (tp * pp):
        errs.append(f"world size({world}) % (tp({tp}) * pp({pp})) = {world % (tp * pp)} != 0: launch "
                    f"--nproc_per_node so that world size = tp*pp*dp")
    if d.num_heads % tp:
        what = " (multi-latent attention splits whole heads)" if d.mla else ""
        errs.append(f"num_attention_heads({d.num_heads}) % tp({tp}) = {d.num_heads % tp} != 0{what}")
    if d.mla:
        for name, n in (("q_lora_rank", d.q_lora_rank), ("kv_lora_rank + qk_rope_head_dim",
                                                           d.kv_lora_rank + d.qk_rope_dim)):
            if n and n % tp:    # column-parallel down-projections of the local spec
                errs.append(f"{name}({n}) % tp({tp}) = {n % tp} != 0 (the down-projection is split along tp)")
    elif d.num_query_groups % tp:
        errs.append(f"num_key_value_heads({d.num_query_groups}) % tp({tp}) = {d.num_query_groups % tp} != 0 "
                    f"(Megatron splits whole query groups)")
    if d.linear_layers:     # gated DeltaNet splits whole key heads, each with its value heads
        for name, n in (("linear_num_key_heads", d.lin_k_heads), ("linear_num_value_heads", d.lin_v_heads)):
            if n % tp:
                errs.append(f"{name}({n}) % tp({tp}) = {n % tp} != 0 (the linear-attention layers split whole heads)")
    if d.num_layers % pp:
        mix = (f" ({len(d.dense_layers)} dense + {d.num_layers - len(d.dense_layers)} MoE layers; each stage holds a "
               f"contiguous run of "
               f"both kinds)") if d.num_experts and d.dense_layers else ""
        errs.append(f"num_hidden_layers({d.num_layers}) % pp({pp}) = {d.num_layers % pp} != 0{mix}")
    if d.ffn_hidden and d.mlp_dense_layers and d.ffn_hidden % tp:
        which = f" (dense layers {list(d.mlp_dense_layers)})" if d.num_experts else ""
        errs.append(f"intermediate_size({d.ffn_hidden}) % tp({tp}) = {d.ffn_hidden % tp} != 0{which}")
    if d.num_experts:
        if d.num_experts % ep:
            errs.append(f"num_experts({d.num_experts}) % ep({ep}) = {d.num_experts % ep} != 0")
        if d.moe_ffn_hidden % etp:
            errs.append(f"moe_intermediate_size({d.moe_ffn_hidden}) % etp({etp}) = {d.moe_ffn_hidden % etp} != 0")
        if d.shared_expert_ffn and d.shared_expert_ffn % tp:
            errs.append(f"shared_expert_intermediate_size({d.shared_expert_ffn}) % tp({tp}) = "
                        f"{d.shared_expert_ffn % tp} != 0")
        if world % (pp * ep * etp):
            errs.append(f"world size({world}) % (pp({pp}) * ep({ep}) * etp({etp})) = {world % (pp * ep * etp)} != 0")
    elif ep != 1:
        errs.append(f"parallel.ep={ep} needs a mixture-of-experts model; {d.model_type} has no experts")
    if errs:
        raise ValueError("impossible parallel layout: " + "; ".join(errs))
    return world // (tp * pp)
