"""Where the Megatron model comes from: the tiny default, an HF checkpoint, or a Megatron dist checkpoint."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_fp8pb.parallel import megatron as mcore
from megatron_fp8pb.sources import readahead
from megatron_fp8pb.archs import Dims, dims_from_hf, rules_for
from megatron_fp8pb.archs.base import TIED_COPY
from megatron_fp8pb.config import ExportConfig, QuantConfig
from megatron_fp8pb.sources.hf import (DictReader, HFReader, check_source, config_dtype, hf_config, read_slice,
                                      stored_dtypes)
from megatron_fp8pb.output.hf_files import source_side_files
from megatron_fp8pb.plan.params import Layout, PlanContext, as_stored_tensors, expected_tensors, plan_param
from megatron_fp8pb.plan.tp_slices import from_slices
from megatron_fp8pb.sources.kinds import kind
from megatron_fp8pb.sources.megatron_plain import plain_source
from megatron_fp8pb.log import log0
from megatron_fp8pb.sources.streamed import hf_params, stage_layers


@dataclass
class Source:
    model: object
    hf_config: object
    dims: Dims
    dtype: torch.dtype
    truth: object | None                  # a reader of the HF tensors the export must reproduce, when known
    extra_files: dict = field(default_factory=dict)
    params: list = field(default_factory=list)            # (Megatron name, tensor or LazyParam) of this rank
    layer_of_local: dict = field(default_factory=dict)    # local layer index -> global layer number
    source_dtypes: dict = field(default_factory=dict)     # HF name -> stored dtype, for the rules as_stored
    unit_order: list[int] | None = None   # a streamed source: the order its units are read and exported in


def source_config(cfg: ExportConfig):
    """The HF config of the configured source (read before any weight)."""
    s = cfg.source
    if s.kind in ("tiny", "random"):
        from megatron_fp8pb.sources.presets import PRESETS, preset_hf_config
        from megatron_fp8pb.sources.tiny import tiny_hf_config
        if s.arch in PRESETS:
            return preset_hf_config(s.arch, s.num_layers)
        cfg = tiny_hf_config(s.arch, s.tie_embeddings)
        if s.num_layers:
            cfg.num_hidden_layers = s.num_layers
        return cfg
    if s.kind == "hf":
        if not s.path:
            raise ValueError("source.kind=hf needs source.path=<HF checkpoint directory>")
        return hf_config(s.path)
    if not s.path or not s.hf_config:
        raise ValueError("source.kind=megatron needs source.path=<dist checkpoint dir> and "
                         "source.hf_config=<HF config.json describing the architecture>")
    return hf_config(s.hf_config)


def load_hf_weights(model, reader, d: Dims, layout: Layout) -> None:
    """Fill every local parameter from the HF slices it holds (each rank reads only its slices)."""
    from megatron_fp8pb.exporter.options import RankView
    view = RankView.of_model(model, d, layout)
    ctx = PlanContext.make(d, layout, QuantConfig(enabled=False), view.layer_of_local, view.num_local_experts)
    with torch.no_grad():
        for name, p in view.params:
            for mcore_name in (name, "embedding.word_embeddings.weight"):   # a tied copy reads the embedding
                plan = plan_param(mcore_name, tuple(p.shape), ctx)
                if plan.rule.shard != TIED_COPY:
                    break
            local = from_slices(plan, [read_slice(reader, s) for s in plan.slices], d)
            p.copy_(local.to(p.dtype))


def fill_random(model, seed: int) -> None:
    """Seeded N(0, 0.02) weights (norms near 1) generated where each parameter lives; the same layout and seed
    give the same model. Used for benchmarks at real shapes without a checkpoint."""
    import zlib
    from megatron.core import parallel_state as ps
    where = f"{ps.get_tensor_model_parallel_rank()}/{ps.get_pipeline_model_parallel_rank()}/" \
            f"{ps.get_expert_model_parallel_rank()}"
    with torch.no_grad():
        for name, p in mcore.local_params(model):
            gen = torch.Generator(device=p.device).manual_seed(seed + zlib.crc32(f"{where}/{name}".encode()))
            p.normal_(0.0, 0.02, generator=gen)
            if "norm" in name:
                p.add_(1.0)


def mtp_only_names(d: Dims) -> set[str]:
    """The HF tensors that only the first multi-token-prediction layer has (its ``enorm``, ``hnorm``, ``eh_proj``,
    ``shared_head.norm``; its decoder layer looks like any other), as the architecture's MTP rules name them."""
    from dataclasses import replace

    from megatron_fp8pb.archs.common import mtp_rules
    return {n for r in mtp_rules(replace(d, mtp_layers=1)) for n in r.hf}


def without_absent_mtp(d: Dims, held: list[str], where: str) -> Dims:
    """``d`` without multi-token-prediction layers where the config names some but the source holds none of the
    first (``held``: the source's MTP tensors of it). transformers' DeepSeek-V3 config defaults to one MTP layer,
    which transformers' own model does not build or save; config.json then says 0."""
    if not d.mtp_layers or held:
        return d
    from dataclasses import replace

    from megatron_fp8pb.log import warn0
    warn0(f"the config names {d.mtp_layers} multi-token-prediction layer(s) (num_nextn_predict_layers) but {where} "
          f"holds none: exported without them, and the written config.json says num_nextn_predict_layers=0")
    return replace(d, mtp_layers=0)


def layout_unit_order(path: str, d: Dims) -> list[int]:
    """The units of the HF checkpoint at ``path`` in the order their bytes arrive when its files are read as they
    lie (``read_plan.unit_order``), the same on every rank."""
    from megatron_fp8pb.plan.params import hf_units
    from megatron_fp8pb.plan.write_order import streamed_unit_order
    from megatron_fp8pb.sources.read_plan import unit_order
    from megatron_fp8pb.sources.safetensors_layout import byte_ranges
    where = byte_ranges(path)
    return unit_order([(n,) + r for n, r in where.items()], hf_units(rules_for(d), d), streamed_unit_order(d))




_DECIDE = object()


def build_source(cfg: ExportConfig, layout: Layout, on_gpu: bool, stream: bool = False, plain=_DECIDE) -> Source:
    """The source on this rank. ``stream``: an HF, tiny or Megatron dist checkpoint source is not loaded into a
    Megatron model; its parameters are read unit by unit while the export runs (``Source.params`` are LazyParams,
    ``model`` None). A Megatron source needs megatron-core's parallel state initialized, but for a dense GPT's
    checkpoint read directly (``plain``: its ``megatron_plain.plain_source`` keys, None for megatron-core's mapping;
    decided here by default)."""
    s = cfg.source
    hfc = source_config(cfg)
    d = dims_from_hf(hfc)
    if s.kind == "tiny":
        from megatron_fp8pb.sources.tiny import random_hf_state
        reader, extra = DictReader(random_hf_state(hfc, s.seed)), {}
        dtype = torch.bfloat16
    elif s.kind == "random":
        reader, extra, dtype = None, {}, torch.bfloat16
    elif s.kind == "hf":
        ahead = readahead.start(s.path, d.num_layers, layout.pp_size, layout.pp_rank, layout.ep_size,
                                layout.ep_rank) if s.readahead else None
        device = torch.device("cuda", torch.cuda.current_device()) if stream and on_gpu else None
        reader, extra = HFReader(s.path, ahead, device), source_side_files(s.path)
        d = without_absent_mtp(d, sorted(mtp_only_names(d) & set(reader.names())), f"source {s.path}")
        check_source(reader, expected_tensors(rules_for(d), d), s.path)
        dtype = config_dtype(hfc)
    else:
        reader, extra = None, source_side_files(s.hf_config)
        dtype = config_dtype(hfc)
    rows = None
    if plain is _DECIDE:
        plain = plain_source(s.kind, s.path, s.hf_config, s.megatron_core)
    plain = plain if stream else None
    ahead = device = None
    if s.kind == "megatron" and stream:
        ahead = readahead.start_checkpoint(s.path, d.num_layers, layout.pp_size, layout.pp_rank, layout.ep_size,
                                           layout.ep_rank, d.num_experts) if s.readahead else None
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else None
    if plain is not None:
        from megatron_fp8pb.sources import megatron_plain as mp
        from megatron_fp8pb.sources.distcp_layout import vocab_rows_of
        rows = vocab_rows_of(plain.index.shapes, s.path, layout.tp_size, d.vocab)
        log0(f"Megatron checkpoint {s.path}: a dense GPT's keys, read without megatron-core")
        params = mp.plain_params(s.path, plain, d, layout, dtype, rows, device, ahead)
        return Source(None, hfc, d, dtype, None, extra, params, stage_layers(d, layout))
    if s.kind == "megatron":
        from megatron_fp8pb.sources import megatron_dist as dcs
        if d.linear_layers:
            from megatron_fp8pb.parallel.gdn_local import require_fla
            require_fla(d.model_type, "source.kind=megatron")
        metadata = dcs.read_checkpoint_metadata(s.path)
        d = without_absent_mtp(d, [k for k in metadata.state_dict_metadata if k.startswith("mtp.")],
                               f"Megatron checkpoint {s.path}")
        rows = dcs.padded_vocab_rows(metadata, s.path, layout.tp_size, d.vocab)
        if stream:
            params = dcs.megatron_params(s.path, metadata, d, layout, dtype, rows, device, ahead)
            return Source(None, hfc, d, dtype, None, extra, params, stage_layers(d, layout))
    if stream and kind(s.kind).streamed:
        # verify compares on the host: a reader into GPU memory is not the truth's reader
        truth = HFReader(s.path) if getattr(reader, "device", None) is not None else reader
        order = layout_unit_order(s.path, d) if s.kind == "hf" else None
        return Source(None, hfc, d, dtype, truth, extra, hf_params(reader, d, layout, dtype), stage_layers(d, layout),
                      stored_dtypes(reader, as_stored_tensors(rules_for(d), d)) if reader is not None else {}, order)
    model = mcore.build_gpt(d, dtype, layout, on_gpu=on_gpu, vocab_rows=rows)
    if reader is not None:
        load_hf_weights(model, reader, d, layout)
    elif s.kind == "random":
        fill_random(model, s.seed)
    else:
        mcore.load_dist_checkpoint(model, s.path)
    return Source(model, hfc, d, dtype, reader, extra, mcore.local_params(model), mcore.layer_numbers(model))
