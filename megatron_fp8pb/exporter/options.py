"""What an export is asked to do (``ExportOptions``) and what this rank holds (``RankView``), each made in one place:
from the config (the CLI) or from the keywords of the in-process API. Serve-target exclusions are resolved here, so
the CLI and the API keep the same layers unquantized for the same ``serve_tp``."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from megatron_fp8pb.archs import Dims
from megatron_fp8pb.config import QuantConfig
from megatron_fp8pb.log import log0, warn0
from megatron_fp8pb.plan.params import Layout


@dataclass(frozen=True)
class ExportOptions:
    """Everything an export is asked to do besides the model and the layout. ``quant.exclude`` already holds the
    modules the serve targets (``quant.serve_tp``) would refuse in FP8; ``out_dtype`` None: the config's dtype."""
    quant: QuantConfig = QuantConfig()
    max_shard_size: str | int = "5GB"
    overwrite: bool = False
    out_dtype: torch.dtype | None = None
    extra_files: dict = field(default_factory=dict)
    writers: str = "rank0"      # output.writers: rank0 | node (node_writers.py)

    @classmethod
    def build(cls, d: Dims, quant: QuantConfig, *, out_dtype: torch.dtype | None = None,
              max_shard_size: str | int = "5GB", overwrite: bool = False,
              extra_files: dict | None = None) -> "ExportOptions":
        """The options with ``quant.serve_tp`` resolved to excludes for the model ``d``."""
        dtype_name = str(out_dtype or torch.bfloat16).replace("torch.", "")
        kept = serve_exclusions(d, quant, dtype_name)
        return cls(replace(quant, exclude=quant.exclude + kept), max_shard_size, overwrite, out_dtype,
                   dict(extra_files or {}))

    @classmethod
    def from_config(cls, q: QuantConfig, output, d: Dims, out_dtype: torch.dtype,
                    extra_files: dict | None = None) -> "ExportOptions":
        """The CLI's options: ``q`` the quant section, ``output`` the output section of the config."""
        return replace(cls.build(d, q, out_dtype=out_dtype, max_shard_size=output.max_shard_size,
                                 overwrite=output.overwrite, extra_files=extra_files), writers=output.writers)

    @classmethod
    def from_keywords(cls, d: Dims, *, quantize: bool = True, exclude=(), quantize_lm_head: bool = False,
                      scale_fmt: str = "amax", serve_tp: str | int | None = None, max_shard_size: str | int = "5GB",
                      overwrite: bool = False, out_dtype: torch.dtype | None = None,
                      extra_files: dict | None = None) -> "ExportOptions":
        """The in-process API's options (``api.export``, ``stream_api.iter_fp8``)."""
        quant = QuantConfig(enabled=quantize, exclude=tuple(exclude), lm_head=quantize_lm_head,
                            serve_tp=None if serve_tp is None else str(serve_tp), scale_fmt=scale_fmt)
        return cls.build(d, quant, out_dtype=out_dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                         extra_files=extra_files)


@dataclass(frozen=True)
class RankView:
    """This rank's share of the model: ``params`` ``[(mcore_name, tensor or LazyParam)]`` (layers numbered as in
    ``layer_of_local``), local layer index -> global layer number, the experts each expert-parallel rank holds, and
    the dtypes its source stores the tensors of ``as_stored`` rules in (HF name -> torch dtype name, where known).
    ``unit_order``: a streamed source's order of units, the same on every rank (None: ``streamed_unit_order``)."""
    params: list
    layer_of_local: dict = field(default_factory=dict)
    num_local_experts: int = 0
    source_dtypes: dict = field(default_factory=dict)
    unit_order: list[int] | None = None

    @classmethod
    def of_model(cls, model, d: Dims, layout: Layout) -> "RankView":
        """A megatron-core model of this rank, or the list of its virtual-pipeline chunks."""
        from megatron_fp8pb.parallel import megatron as mcore
        return cls(mcore.local_params(model), mcore.layer_numbers(model), mcore.num_local_experts(d, layout))

    @classmethod
    def of_source(cls, src, layout: Layout) -> "RankView":
        """A ``sources.Source`` (a built model or a streamed checkpoint)."""
        from megatron_fp8pb.parallel import megatron as mcore
        return cls(src.params, src.layer_of_local, mcore.num_local_experts(src.dims, layout),
                   dict(getattr(src, "source_dtypes", None) or {}), getattr(src, "unit_order", None))


def serve_exclusions(d: Dims, quant: QuantConfig, dtype_name: str = "bfloat16") -> tuple[str, ...]:
    """Modules a target of ``quant.serve_tp`` would refuse (or, transformers, dequantize wrong) in FP8, with their
    fusion groups: kept unquantized. A loud warning when that is most of the linears."""
    from megatron_fp8pb.archs import default_exclude, rules_for
    from megatron_fp8pb.archs.base import hf_module
    from megatron_fp8pb.plan.params import linear_weights
    from megatron_fp8pb.verify.serve_check import layers_for_transformers, layers_to_keep_unquantized
    serve_tp = quant.serve_tp
    tps, for_transformers = quant.serve_targets()
    if not (tps or for_transformers) or not quant.enabled:
        return ()
    mods = {hf_module(n): s for n, s in linear_weights(rules_for(d), d, quant.lm_head and d.tie_embeddings).items()
            if quant.quantizes(hf_module(n), default_exclude(d))}
    kv = d.num_query_groups
    keep = set(layers_to_keep_unquantized(mods, tps, num_kv_heads=kv)) if tps else set()
    if for_transformers:
        keep |= set(layers_for_transformers(mods))
    keep = sorted(keep)
    if keep:
        targets = ([f"vLLM/SGLang at tp={','.join(map(str, tps))}"] if tps else []) + \
            (["transformers"] if for_transformers else [])
        log0(f"quant.serve_tp={serve_tp}: keeping {len(keep)} layer(s) unquantized so that {' and '.join(targets)} "
             f"load the checkpoint right, e.g. {keep[:4]}")
    if mods and 2 * len(keep) > len(mods):
        fine = [t for t in (1, 2, 4, 8, 16) if not layers_to_keep_unquantized(mods, t, num_kv_heads=kv)]
        msg = (f"quant.serve_tp={serve_tp} keeps {len(keep)} of {len(mods)} quantizable linears unquantized: the "
               f"checkpoint is mostly {dtype_name}, not FP8.")
        if tps:
            msg += (f" vLLM/SGLang keep every linear quantized at tp={','.join(map(str, fine))}" if fine else
                    " vLLM/SGLang keep every linear quantized at no tp up to 16") + \
                " (the per-rank rows/columns of the others are not multiples of 128)."
        if for_transformers:
            msg += (f" {len(layers_for_transformers(mods))} of them because transformers' dequantize needs rows and "
                    f"columns in multiples of 128: leave transformers out of quant.serve_tp where only vLLM/SGLang "
                    f"serve it.")
        warn0(msg)
    return tuple(keep)
