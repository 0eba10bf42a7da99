"""The export's side of megatron.core: its parallel state (started by ``session``), ranks, building a GPTModel from
Dims, dist checkpoints (``sources.fill_random`` also reads parallel_state ranks)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_fp8pb.archs.base import Dims
from megatron_fp8pb.plan.params import Layout


@dataclass
class Groups:
    """Process groups the export needs, passed explicitly (never cached in module state)."""
    tp: object
    etp: object
    device: torch.device


def padded_vocab(vocab: int, tp_size: int, divisible_by: int = 128) -> int:
    """Megatron's padding: the smallest multiple of ``divisible_by * tp_size`` >= vocab."""
    m = divisible_by * tp_size
    return -(-vocab // m) * m


def initialize_parallel(tp: int, pp: int, ep: int = 1, etp: int | None = None, vp: int | None = None) -> None:
    """``vp``: virtual pipeline chunks per stage (interleaved schedule), None for one chunk."""
    from megatron.core import parallel_state
    if parallel_state.model_parallel_is_initialized():
        return
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep, expert_tensor_parallel_size=etp or tp,
                                 virtual_pipeline_model_parallel_size=vp)


def destroy_parallel() -> None:
    from megatron.core import parallel_state
    parallel_state.destroy_model_parallel()


def layout_and_groups() -> tuple[Layout, Groups]:
    """This rank's place in the initialized Megatron layout, and the groups the export needs."""
    from megatron.core import parallel_state
    st = parallel_state
    layout = Layout(
        tp_size=st.get_tensor_model_parallel_world_size(), tp_rank=st.get_tensor_model_parallel_rank(),
        pp_size=st.get_pipeline_model_parallel_world_size(), pp_rank=st.get_pipeline_model_parallel_rank(),
        ep_size=st.get_expert_model_parallel_world_size(), ep_rank=st.get_expert_model_parallel_rank(),
        etp_size=st.get_expert_tensor_parallel_world_size(), etp_rank=st.get_expert_tensor_parallel_rank(),
        exporting=st.get_data_parallel_rank() == 0,
        expert_exporting=st.get_expert_data_parallel_rank() == 0)
    from megatron_fp8pb.parallel import collectives as coll
    device = coll.comm_device()
    return layout, Groups(st.get_tensor_model_parallel_group(), st.get_expert_tensor_parallel_group(), device)


def transformer_config(d: Dims, dtype: torch.dtype, layout: Layout, on_gpu: bool):
    """The megatron-core config: common settings here, the architecture's own from its unit (``Arch.mcore``)."""
    from megatron.core.transformer import MLATransformerConfig, TransformerConfig
    from megatron_fp8pb.archs import arch
    from megatron_fp8pb.archs.common import moe_mcore
    kw = dict(
        num_layers=d.num_layers, hidden_size=d.hidden, num_attention_heads=d.num_heads,
        num_query_groups=d.num_query_groups, kv_channels=d.head_dim, ffn_hidden_size=d.ffn_hidden,
        normalization="RMSNorm", layernorm_epsilon=d.norm_eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=d.qkv_bias, qk_layernorm=d.qk_norm, bias_activation_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        gradient_accumulation_fusion=False, use_cpu_initialization=not on_gpu, perform_initialization=False,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        tensor_model_parallel_size=layout.tp_size, pipeline_model_parallel_size=layout.pp_size,
        sequence_parallel=False, hidden_dropout=0.0, attention_dropout=0.0,
        # the layer specs are megatron-core's local ones (no TransformerEngine): modules the config picks itself
        # (MLA's q/kv norms) must come from the same backend
        transformer_impl="local")
    if d.num_experts:
        kw.update(moe_mcore(d, on_gpu), expert_model_parallel_size=layout.ep_size,
                  expert_tensor_parallel_size=layout.etp_size)
    kw.update(arch(d.model_type).mcore(d))
    cls = MLATransformerConfig if kw.get("multi_latent_attention") else TransformerConfig
    if cls is MLATransformerConfig:
        kw.update(rotary_base=d.rope_theta)
    return cls(**kw)


class MLACoreAttention(torch.nn.Module):
    """Causal softmax attention whose key width differs from its value width (multi-latent attention).

    Stands in for the local spec's ``DotProductAttention``, which megatron-core 0.16 builds without ``k_channels`` /
    ``v_channels`` and so refuses for MLA. It holds no weights, so the export is the same whichever attention
    kernel a training job uses; its forward is plain eager attention (used to check logits, not for speed).
    query / key [s, b, heads, k_dim], value [s, b, heads, v_dim] -> [s, b, heads * v_dim]."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, softmax_scale=None, k_channels=None,
                 v_channels=None, cp_comm_type=None, pg_collection=None, **_):
        super().__init__()
        self.softmax_scale = softmax_scale if softmax_scale is not None else (k_channels or 1) ** -0.5

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_):
        if packed_seq_params is not None:
            raise ValueError("the MLA stand-in attention does not take packed sequences")
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))       # [b, heads, s, dim]
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.softmax_scale
        sq, sk = scores.shape[-2:]
        causal = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).triu(sk - sq + 1)
        probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
        out = torch.matmul(probs, v.float()).to(value.dtype)                # [b, heads, s, v_dim]
        return out.permute(2, 0, 1, 3).reshape(sq, out.shape[0], -1)


def layer_spec(d: Dims, cfg, vp_stage: int | None = None):
    """The layer spec(s) of the local (no TransformerEngine) backend the unit asks for: one spec for every layer,
    or per-layer specs (dense layers below MoE layers, multi-latent attention)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron_fp8pb.archs import arch
    unit = arch(d.model_type)
    if not unit.block_spec:
        spec = get_gpt_layer_local_spec(num_experts=d.num_experts or None, moe_grouped_gemm=False,
                                        **{"qk_layernorm": d.qk_norm, **unit.spec(d)})
        if d.qk_norm_full:      # MiniMax-M2: q/k norms over all heads, split along heads
            from megatron_fp8pb.parallel.qk_norm_local import full_width_qk_norms
            attn = spec.submodules.self_attention.submodules
            attn.q_layernorm, attn.k_layernorm = full_width_qk_norms()
        return spec
    # megatron-core >= 0.19 builds the experimental variants (DSA, gated DeltaNet) only through its
    # TransformerEngine spec and refuses them here: the plain block is built, and their modules put in below
    variant, cfg.experimental_attention_variant = getattr(cfg, "experimental_attention_variant", None), None
    try:
        block = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization="RMSNorm",
                                           vp_stage=vp_stage)
    finally:
        cfg.experimental_attention_variant = variant
    if d.linear_layers:     # gated DeltaNet (Qwen3-Next, Qwen3.5) in place of self attention
        import copy
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
        from megatron_fp8pb.parallel.gdn_local import gated_delta_net_attention, require_fla
        require_fla(d.model_type, "a Megatron model")
        first = get_transformer_layer_offset(cfg, vp_stage)
        for k, spec in enumerate(block.layer_specs):
            if first + k in d.linear_layers:
                spec = block.layer_specs[k] = copy.deepcopy(spec)
                spec.submodules.self_attention = gated_delta_net_attention()
                # saved under TransformerEngine's name (megatron-core's hybrid spec fuses it into in_proj)
                keys = dict(spec.submodules.sharded_state_dict_keys_map or {})
                keys["input_layernorm."] = "self_attention.in_proj.layer_norm_"
                spec.submodules.sharded_state_dict_keys_map = keys
    if d.mla:
        from megatron.core.transformer.identity_op import IdentityOp
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
        first = get_transformer_layer_offset(cfg, vp_stage)
        for k, spec in enumerate(block.layer_specs):
            if d.indexer_layers:    # the block's layers may share one spec object: each its own attention
                import copy
                spec = block.layer_specs[k] = copy.deepcopy(spec)
            attn = spec.submodules.self_attention.submodules
            attn.core_attention = MLACoreAttention
            if first + k in d.indexer_layers:    # DSA: megatron-core's indexer (GLM-5's shared layers hold none)
                from megatron_fp8pb.parallel.dsa_local import dsa_core_attention
                attn.core_attention = dsa_core_attention()
            if not d.q_lora_rank:   # no q latent, no q norm (megatron-core 0.19 refuses one that would go unused)
                attn.q_layernorm = IdentityOp
    return block


def build_gpt(d: Dims, dtype: torch.dtype, layout: Layout, *, on_gpu: bool = False, vocab_divisible_by: int = 128,
              vocab_rows: int | None = None, vp_stage: int | None = None):
    """A megatron-core GPTModel for this pipeline stage (its chunk ``vp_stage`` under a virtual pipeline), weights
    uninitialized (a loader fills them).

    ``vocab_rows``: the padded vocabulary to build with (default: Megatron's padding of the real one for this tp).
    Experts are built as SequentialMLP (``mlp.experts.local_experts.{x}.linear_fc1/fc2.weight``): it needs neither
    TransformerEngine nor grouped_gemm, and a dist checkpoint saved from TEGroupedMLP or GroupedMLP loads into it."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    if on_gpu:
        from megatron.core import tensor_parallel
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
    cfg = transformer_config(d, dtype, layout, on_gpu)
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vp:
        cfg.virtual_pipeline_model_parallel_size = vp
    with _cpu_current_device(on_gpu):
        spec = layer_spec(d, cfg, vp_stage)
    kw = dict(vocab_size=vocab_rows or padded_vocab(d.vocab, layout.tp_size, vocab_divisible_by),
              max_sequence_length=d.max_positions,
              pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=vp is None, vp_stage=vp_stage),
              post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=vp is None, vp_stage=vp_stage),
              share_embeddings_and_output_weights=d.tie_embeddings, position_embedding_type="rope",
              rotary_base=int(d.rope_theta))
    if vp_stage is not None:
        kw["vp_stage"] = vp_stage
    if getattr(cfg, "mtp_num_layers", None):    # multi-token prediction, built on the last pipeline stage
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec
        with _cpu_current_device(on_gpu):
            kw["mtp_block_spec"] = get_gpt_mtp_block_spec(cfg, spec, use_transformer_engine=False, vp_stage=vp_stage)
    from megatron_fp8pb.archs import arch
    kw.update(arch(d.model_type).gpt(d))
    if on_gpu:
        with _mla_without_te():
            return GPTModel(cfg, spec, **kw).cuda()
    # On CPU, skip the first/last-stage embedding all-reduce (it moves the tied copy to CUDA); the loader fills
    # the last stage's copy of a tied embedding from the same source slices instead.
    from megatron.core.models.common.language_module.language_module import LanguageModule
    saved = LanguageModule._is_in_embd_group
    LanguageModule._is_in_embd_group = lambda self: False
    try:
        with _cpu_current_device(on_gpu), _mla_without_te():
            return GPTModel(cfg, spec, **kw)
    finally:
        LanguageModule._is_in_embd_group = saved


def unwrap(model):
    """DDP / Float16Module wrappers -> the GPTModel inside."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def chunks(model) -> list:
    """A model, or the list of model chunks of this rank (virtual pipeline / interleaved schedule) -> the chunks."""
    return [unwrap(m) for m in model] if isinstance(model, (list, tuple)) else [unwrap(model)]


def _local_layer_numbers(m) -> dict[int, int]:
    if getattr(m, "decoder", None) is None:
        return {}
    return {j: layer.layer_number - 1 for j, layer in enumerate(m.decoder.layers)}


def _global_name(name: str, numbers: dict[int, int]) -> str:
    """``decoder.layers.{local}.rest`` -> ``decoder.layers.{global}.rest`` (chunks number their layers from 0)."""
    if not name.startswith("decoder.layers."):
        return name
    j, rest = name[len("decoder.layers."):].split(".", 1)
    return f"decoder.layers.{numbers[int(j)]}.{rest}"


def layer_numbers(model) -> dict[int, int]:
    """Layer index in the names ``local_params`` returns -> global (0-based) layer number: the names already carry
    global numbers, so this is the identity over this rank's layers (of every chunk)."""
    return {g: g for m in chunks(model) for g in _local_layer_numbers(m).values()}


# buffers that are weights of the architecture (the router's per-expert score correction)
_WEIGHT_BUFFERS = ("expert_bias",)


class LocalParams(list):
    """``[(mcore_name, tensor)]`` of this rank, layers numbered globally, plus ``styles``: mcore_name -> how its
    module partitions it ("colwise" / "rowwise" / "replicated"; None when the module is not a known kind)."""

    def __init__(self, items, styles: dict[str, str | None]):
        super().__init__(items)
        self.styles = styles


def local_params(model) -> LocalParams:
    """Parameters of this rank's model chunk(s) (a model or a list of virtual-pipeline chunks), and the buffers
    that hold weights (a router's ``expert_bias``); extra state excluded."""
    items, styles = [], {}
    for m in chunks(model):
        numbers = _local_layer_numbers(m)
        for mod_name, mod in m.named_modules():
            tensors = list(mod.named_parameters(recurse=False))
            tensors += [(n, b) for n, b in mod.named_buffers(recurse=False) if n in _WEIGHT_BUFFERS and b is not None]
            for n, t in tensors:
                name = _global_name(f"{mod_name}.{n}" if mod_name else n, numbers)
                items.append((name, t))
                styles[name] = _style(mod, n, t)
    return LocalParams(items, styles)


def _style(mod, pname: str, p) -> str | None:
    """How megatron-core partitions a parameter, from its attributes or its module's class. "head-replicated": a
    full-width k norm whose kv heads several ranks hold (``qk_norm_local``), which no rule maps."""
    if getattr(p, "head_replicas", 1) > 1:
        return "head-replicated"
    if getattr(p, "tensor_model_parallel", False) and getattr(p, "partition_dim", -1) in (0, 1):
        return "colwise" if p.partition_dim == 0 else "rowwise"
    cls = type(mod).__name__
    if pname.startswith("layer_norm_") or "Norm" in cls or cls in ("TopKRouter", "SharedExpertMLP", "IdentityOp"):
        return "replicated"
    mode = getattr(mod, "parallel_mode", None)
    if mode in ("column", "row", "duplicated"):
        return {"column": "colwise", "row": "rowwise", "duplicated": "replicated"}[mode]
    if "ColumnParallel" in cls or cls == "VocabParallelEmbedding":
        return "colwise"
    if "RowParallel" in cls:
        return "rowwise" if pname == "weight" else "replicated"
    if isinstance(mod, torch.nn.Linear):
        return "replicated"
    return None


def mtp_layer_count(model) -> int:
    """Multi-token-prediction layers this rank's chunk(s) hold (megatron-core builds them on the last stage)."""
    return sum(len(m.mtp.layers) for m in chunks(model) if getattr(m, "mtp", None) is not None)


def num_local_experts(d: Dims, layout: Layout) -> int:
    return d.num_experts // layout.ep_size if d.num_experts else 0


@contextlib.contextmanager
def _cpu_current_device(on_gpu: bool):
    """megatron-core places a few buffers (rotary embedding, MoE router) on torch.cuda.current_device() even with
    use_cpu_initialization; on a CPU-only host that device is the CPU."""
    if on_gpu or torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.current_device = saved


class _NoTransformerEngine:
    """A class nothing is an instance of."""


@contextlib.contextmanager
def _mla_without_te():
    """megatron-core's MLA asks ``isinstance(linear_proj, TELinear)``, which fails when TransformerEngine's linear is
    absent (megatron-core then holds a placeholder that is not a class): stand in a class during the build."""
    from megatron.core.transformer import multi_latent_attention as mla
    saved = getattr(mla, "TELinear", None)
    if isinstance(saved, type):
        yield
        return
    mla.TELinear = _NoTransformerEngine
    try:
        yield
    finally:
        mla.TELinear = saved


@contextlib.contextmanager
def _cpu_safe_cuda_sync():
    """dist_checkpointing calls torch.cuda.synchronize() and puts a status flag on torch.cuda.current_device()
    unconditionally; on a CPU-only run there is nothing to wait for and the flag lives on the CPU."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = saved


def save_dist_checkpoint(model, path: str, content_metadata: dict | None = None) -> None:
    """``content_metadata``: how the state dict is laid out (e.g. ``{"singleton_local_shards": True}``: experts as
    one tensor each), saved with the checkpoint as a Megatron training job does."""
    from megatron.core import dist_checkpointing
    os.makedirs(path, exist_ok=True)
    with _cpu_safe_cuda_sync():
        dist_checkpointing.save(unwrap(model).sharded_state_dict(metadata=content_metadata), path,
                                content_metadata=content_metadata)


def checkpoint_content_metadata(path: str) -> dict | None:
    """The content metadata a Megatron job saved with its dist checkpoint (how its state dict was laid out, e.g.
    experts as singleton shards): ``sharded_state_dict(metadata=...)`` must be asked with it to describe the same
    layout. None when absent or unreadable (the common file may hold objects only the training code can load)."""
    import pickle
    from megatron.core import dist_checkpointing
    try:
        return dist_checkpointing.load_content_metadata(path)
    except (OSError, RuntimeError, pickle.UnpicklingError):
        return None


def load_dist_checkpoint(model, path: str) -> None:
    """Load a megatron.core.dist_checkpointing checkpoint (any saved TP/PP) into this layout (resharding)."""
    from megatron.core import dist_checkpointing
    m = unwrap(model)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"source.path {path} is not a Megatron distributed checkpoint directory")
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        with _cpu_safe_cuda_sync():
            state = dist_checkpointing.load(m.sharded_state_dict(metadata=checkpoint_content_metadata(path)), path)
    except (CheckpointingException, CheckpointException) as e:
        raise ValueError(f"Megatron checkpoint {path} does not fit the architecture of source.hf_config ({e}); it "
                         f"was saved from a different model: point source.hf_config at that model's config") from e
    missing, unexpected = m.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise ValueError(f"Megatron checkpoint {path} lacks {missing[:5]}: it was saved from a different "
                         f"architecture than source.hf_config describes")
