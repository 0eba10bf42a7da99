"""megatron-core's DSA indexer (DeepSeek sparse attention) built with the local backend: the indexer of each layer
that has one, so that a Megatron model of DeepSeek-V3.2 / GLM-5 holds ``core_attention.indexer.*`` as training
saves them.

megatron-core builds the indexer's projections with the backend's ``linear()`` and ``parallel_mode="duplicated"``,
which only TransformerEngine provides (``TELinear``); ``DuplicatedLinear`` is that module without it: one weight
[out, in], whole on every tensor-parallel rank, saved replicated. The core attention is megatron-core's own
``DSAttention`` (its weights are the indexer's); the export never runs it.
"""
from __future__ import annotations

import torch


class DuplicatedLinear(torch.nn.Module):
    """A linear layer replicated over tensor parallelism (what ``TELinear`` with ``parallel_mode="duplicated"`` is):
    ``weight`` [output_size, input_size], no bias. x [..., in] -> (x @ weight.T, None)."""

    parallel_mode = "duplicated"

    def __init__(self, input_size: int, output_size: int, *, config, init_method=None, bias: bool = False,
                 skip_bias_add: bool = False, skip_weight_param_allocation: bool = False,
                 parallel_mode: str = "duplicated", **_):
        super().__init__()
        if bias or parallel_mode != "duplicated" or skip_weight_param_allocation:
            raise ValueError(f"DuplicatedLinear builds an unbiased replicated weight; asked for bias={bias}, "
                             f"parallel_mode={parallel_mode!r}, skip_weight_param_allocation="
                             f"{skip_weight_param_allocation}")
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))
        if init_method is not None and self.weight.device.type != "meta":
            init_method(self.weight)

    def forward(self, x: torch.Tensor):
        return torch.nn.functional.linear(x, self.weight), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, {},
                                                   sharded_offsets)


def dsa_core_attention():
    """The ModuleSpec of megatron-core's DSAttention whose indexer is built with local modules."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.transformer.experimental_attention_variant.dsa import (DSAIndexer, DSAIndexerSubmodules,
                                                                             DSAttention, DSAttentionSubmodules)
    from megatron.core.transformer.spec_utils import ModuleSpec
    norm = LocalSpecProvider().layer_norm(rms_norm=False, for_qk=True)
    return ModuleSpec(module=DSAttention, submodules=DSAttentionSubmodules(indexer=ModuleSpec(
        module=DSAIndexer, submodules=DSAIndexerSubmodules(linear_wq_b=DuplicatedLinear, linear_wk=DuplicatedLinear,
                                                           k_norm=norm, linear_weights_proj=DuplicatedLinear))))
