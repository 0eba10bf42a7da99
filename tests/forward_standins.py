"""Stand-ins that let megatron-core's forward of the 2026 families (DSA, gated DeltaNet) run where a piece it calls is
missing, each computing what the missing piece computes; the weights and the name mapping are not touched.

- DSA indexer: megatron-core rotates the indexer's q and k by a Hadamard transform (``rotate_activation``), which
  needs the CUDA extension fast_hadamard_transform and bf16 input. The rotation is orthogonal, so it keeps every
  q.k score (at power-of-two head dims); transformers' indexer leaves it out, and so does the stand-in.
- DSA indexer on megatron-core < 0.19: its ``_apply_rope`` rotates the last ``qk_pos_emb_head_dim`` dims of each
  indexer head with MLA's interleaved pairing; DeepSeek's reference, transformers and megatron-core 0.19 rotate the
  first ones (half-split for DeepSeek-V3.2, interleaved for GLM-5: 0.19's ``dsa_indexer_rope_interleaved``). The
  stand-in is 0.19's layout. Only the top-k choice depends on it: with ``index_topk >= seq`` it changes nothing.
- Gated DeltaNet on the CPU: flash-linear-attention's ``l2norm`` and ``chunk_gated_delta_rule`` are Triton kernels;
  the stand-ins are a torch l2norm and megatron-core's own ``torch_chunk_gated_delta_rule`` (what its
  ``deterministic_mode`` runs). The causal conv1d: 0.16 falls back to torch's conv without causal-conv1d; 0.19 calls
  fla's, for which the stand-in is the same grouped conv.
- Qwen3-Next / Qwen3.5 norms: transformers' Qwen3NextRMSNorm scales by ``1 + weight`` (zero-centered gamma; the
  gated DeltaNet output norm by ``weight``). megatron-core computes that with ``layernorm_zero_centered_gamma``,
  which only TransformerEngine's norm supports (the local backend's torch norm refuses it): the stand-in gives the
  local RMSNorms of the model, except ``out_norm``, the zero-centered forward.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

DSA = ("deepseek_v32", "glm_moe_dsa")
GDN = ("qwen3_next", "qwen3_5_moe_text")


def mcore_version() -> tuple[int, int]:
    import megatron.core
    return tuple(int(x) for x in megatron.core.__version__.split(".")[:2])


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """fla's l2norm: x / sqrt(sum(x^2) + eps) along ``dim``."""
    return x * torch.rsqrt((x.float() * x.float()).sum(dim, keepdim=True) + eps).to(x.dtype)


def _causal_conv1d(x, weight, bias=None, activation=None, **_):
    """fla's causal_conv1d on [b, s, d] input with a depthwise weight [d, w] -> ([b, s, d], None)."""
    d, w = weight.shape
    y = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=w - 1, groups=d)[..., :x.shape[1]]
    if activation in ("silu", "swish"):
        y = F.silu(y)
    return y.transpose(1, 2), None


def _indexer_rope_first(interleaved: bool):
    """DSAIndexer._apply_rope of megatron-core 0.19: rotate the first qk_pos_emb_head_dim dims of each head."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    def apply(self, x, rotary_pos_emb, mscale, **_):
        x_pe, x_nope = torch.split(x, [self.qk_pos_emb_head_dim, self.index_head_dim - self.qk_pos_emb_head_dim],
                                   dim=-1)
        x_pe = _apply_rotary_pos_emb_bshd(x_pe, rotary_pos_emb, rotary_interleaved=False,
                                          multi_latent_attention=interleaved, mscale=mscale)
        return torch.cat([x_pe, x_nope], dim=-1)
    return apply


def _zero_centered(mod: torch.nn.RMSNorm):
    def forward(x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + mod.eps)
        return (y * (1.0 + mod.weight.float())).to(x.dtype)
    return forward


def before_build(model_type: str, setattr_=setattr, on_gpu: bool = False) -> None:
    """Put the module-level stand-ins of ``model_type`` in place (``setattr_``: e.g. pytest's monkeypatch.setattr)."""
    if model_type in DSA:
        dsa = importlib.import_module("megatron.core.transformer.experimental_attention_variant.dsa")
        setattr_(dsa, "rotate_activation", lambda x: x)
        if mcore_version() < (0, 19):
            setattr_(dsa.DSAIndexer, "_apply_rope", _indexer_rope_first(model_type == "glm_moe_dsa"))
    if model_type in GDN and not on_gpu:
        if mcore_version() < (0, 19):
            gdn = importlib.import_module("megatron.core.ssm.gated_delta_net")
            setattr_(gdn, "l2norm", l2norm)
            setattr_(gdn, "chunk_gated_delta_rule", gdn.torch_chunk_gated_delta_rule)
        else:
            common = importlib.import_module("megatron.core.ssm.gated_delta_net.common")
            gdn = importlib.import_module("megatron.core.ssm.gated_delta_net.gdn")
            setattr_(common, "l2norm", l2norm)
            setattr_(gdn, "chunk_gated_delta_rule", common.torch_chunk_gated_delta_rule)
            setattr_(gdn, "causal_conv1d", _causal_conv1d)


def after_build(model_type: str, model) -> int:
    """Give the built model its per-module stand-ins; returns how many norms were made zero-centered."""
    if model_type in DSA:
        # a bf16 job's Float16Module casts every parameter to bf16; the local spec builds the indexer's k_norm
        # (torch LayerNorm) in float32, which CUDA's layer_norm refuses beside bf16 activations
        dtype = model.embedding.word_embeddings.weight.dtype if hasattr(model, "embedding") else None
        for name, mod in model.named_modules():
            if dtype is not None and isinstance(mod, torch.nn.LayerNorm) and mod.weight.dtype != dtype:
                mod.to(dtype)
        return 0
    if model_type not in GDN:
        return 0
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.RMSNorm) and not name.endswith("out_norm"):
            mod.forward = _zero_centered(mod)
            n += 1
    return n
