"""megatron-core's gated DeltaNet (``GatedDeltaNet``, Qwen3-Next / Qwen3.5 linear attention) built with the local
backend, so that a Megatron model of those families holds ``self_attention.in_proj`` / ``conv1d`` / ``A_log`` /
``dt_bias`` / ``out_norm`` / ``out_proj`` as training saves them.

megatron-core's own hybrid spec (``get_transformer_block_with_experimental_attention_variant_spec``) takes its modules
from TransformerEngine only; this is the same GatedDeltaNet with the local column / row parallel linears and a separate
input norm (``input_layernorm.weight``), saved under the key TransformerEngine's fused module has
(``self_attention.in_proj.layer_norm_weight``, ``parallel.megatron.layer_spec``). Its dist-checkpoint layout is
GatedDeltaNet's own: ``in_proj`` saved as its six parts [q; k; v; z; b; a], each split by tensor parallelism, so a
checkpoint saved at one tp loads at another. megatron-core refuses to build GatedDeltaNet
unless flash-linear-attention (``fla``, which imports triton) is importable; the export never runs it.
"""
from __future__ import annotations

FLA_FIX = ("install flash-linear-attention and triton (pip install flash-linear-attention triton: no GPU needed, no "
           "torch pulled) or export from the HF checkpoint (source.kind=hf), which "
           "needs neither")


def fla_missing() -> str | None:
    """Why megatron-core cannot build GatedDeltaNet here (flash-linear-attention does not import), or None."""
    try:
        from megatron.core.ssm import gated_delta_net
    except ImportError as e:     # an older megatron-core
        return f"megatron-core has no megatron.core.ssm.gated_delta_net ({e}); megatron-core >= 0.16 has it"
    if gated_delta_net.HAVE_FLA:
        return None
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    except Exception as e:     # ImportError, or triton failing at import
        return f"flash-linear-attention does not import ({type(e).__name__}: {e})"
    return "flash-linear-attention imported after megatron-core looked for it"


def require_fla(model_type: str, why: str) -> None:
    """Refuse, naming the reason and the fix, when megatron-core cannot build GatedDeltaNet here.

    ``why``: what needs the Megatron model (e.g. "source.kind=megatron")."""
    missing = fla_missing()
    if missing is not None:
        raise ValueError(f"{why} with a {model_type} config needs megatron-core's GatedDeltaNet (its linear-attention "
                         f"layers), which megatron-core builds only with flash-linear-attention: {missing}; "
                         f"{FLA_FIX}")


def gated_delta_net_attention():
    """The ModuleSpec of megatron-core's GatedDeltaNet with local modules (what replaces a layer's self attention)."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec
    return ModuleSpec(module=GatedDeltaNet, submodules=GatedDeltaNetSubmodules(
        in_proj=ColumnParallelLinear, out_norm=LocalSpecProvider().layer_norm(rms_norm=True, for_qk=False),
        out_proj=RowParallelLinear))
