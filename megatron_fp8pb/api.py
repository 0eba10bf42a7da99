"""The in-process API: export a live Megatron model from inside a training job (call on every rank)."""
from __future__ import annotations

import torch

from megatron_fp8pb.parallel import megatron as mcore
from megatron_fp8pb.parallel import session
from .archs import Dims, dims_from_hf
from megatron_fp8pb.sources.hf import config_dtype
from megatron_fp8pb.exporter.pipeline import ExportResult, run_export
from megatron_fp8pb.exporter.options import ExportOptions, RankView


def model_dims(model, hf_config) -> Dims:
    """Collective: the dims of ``hf_config`` with the multi-token-prediction layers the Megatron model has (the last
    stage holds them): they are written when present, and config.json says how many (a config that names MTP
    layers the model lacks is corrected, not trusted)."""
    from dataclasses import replace

    from megatron_fp8pb.parallel import collectives as coll
    d = dims_from_hf(hf_config)
    counts = coll.gather_objects(mcore.mtp_layer_count(model))
    have = coll.broadcast_object(max(counts) if counts is not None else None)
    return d if have == d.mtp_layers else replace(d, mtp_layers=have)


def export(model, hf_config, out_dir: str, *, quantize: bool = True, exclude: tuple[str, ...] = (),
           quantize_lm_head: bool = False, max_shard_size: str | int = "5GB", overwrite: bool = False,
           extra_files: dict | None = None, out_dtype: torch.dtype | None = None,
           scale_fmt: str = "amax", serve_tp: str | int | None = None) -> ExportResult:
    """Write ``model`` (a megatron-core GPTModel of this rank, or the list of its virtual-pipeline chunks;
    parallel_state initialized) as an HF block-FP8 checkpoint at ``out_dir``. ``hf_config``: the transformers config
    of the architecture (real vocab size). ``scale_fmt``: "amax" (block scale amax/448) or "ue8m0" (rounded up to a
    power of two; quantization_config says ``"scale_fmt": "ue8m0"``). ``serve_tp``: the serving targets whose
    refusals stay unquantized, as the config key quant.serve_tp (``4``, ``"transformers"``, ``"2,8,transformers"``)."""
    d = model_dims(model, hf_config)
    job = session.joined()
    options = ExportOptions.from_keywords(
        d, quantize=quantize, exclude=exclude, quantize_lm_head=quantize_lm_head, scale_fmt=scale_fmt,
        serve_tp=serve_tp, max_shard_size=max_shard_size, overwrite=overwrite,
        out_dtype=out_dtype or config_dtype(hf_config), extra_files=extra_files)
    return run_export(RankView.of_model(model, d, job.layout), d, job.layout, job.groups, hf_config, out_dir, options)
