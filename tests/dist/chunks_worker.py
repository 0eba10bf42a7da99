"""torchrun worker for tests of what a training job hands the in-process API:

``vpp``: model chunks of an interleaved (virtual) pipeline, a list per rank;
``replicated``: MLA down-projections held whole on every tp rank (as TransformerEngine's duplicated TELinear holds
them), quantized by the rank that writes them with no collective;
``uneven``: pipeline stages of unequal depth (``num_layers_in_first_pipeline_stage``, last argument), as a model
whose layer count pp does not divide (DeepSeek-V3's 61) is trained."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from megatron_fp8pb import export
from megatron_fp8pb.parallel import collectives as coll
from megatron_fp8pb.parallel import megatron as mcore
from megatron_fp8pb.parallel import session  # noqa: E402
from megatron_fp8pb.config import ParallelConfig  # noqa: E402
from megatron_fp8pb.archs import dims_from_hf  # noqa: E402
from megatron_fp8pb.sources.hf import HFReader, hf_config  # noqa: E402
from megatron_fp8pb.exporter.options import ExportOptions, RankView  # noqa: E402
from megatron_fp8pb.exporter.pipeline import run_export  # noqa: E402
from megatron_fp8pb.sources.registry import load_hf_weights  # noqa: E402


def main(mode: str, src: str, dst: str, tp: int, pp: int, vp: int) -> None:
    with session.started(ParallelConfig(tp=tp, pp=pp, backend="gloo", device="cpu", timeout_s=120),
                         vp=(vp or None) if mode == "vpp" else None) as job:
        if mode == "vpp":
            result = export_chunks(src, dst, job.layout, vp)
        elif mode == "uneven":
            result = export_uneven(src, dst, job.layout, vp)
        else:
            result = export_replicated(src, dst, job.layout, job.groups)
        if coll.rank() == 0:
            print(f"CHUNKS_OK tensors={result.num_tensors} traffic={result.traffic.__dict__}")


def export_chunks(src: str, dst: str, layout, vp: int):
    """Model chunks of an interleaved pipeline, a list per rank, through the in-process API."""
    cfg = hf_config(src)
    d = dims_from_hf(cfg)
    chunks = [mcore.build_gpt(d, torch.bfloat16, layout, vp_stage=k) for k in range(vp)]
    load_hf_weights(chunks, HFReader(src), d, layout)
    return export(chunks, cfg, dst, max_shard_size="200KB")


def export_uneven(src: str, dst: str, layout, first: int):
    """A model whose first pipeline stage holds ``first`` layers and the others the rest, evenly."""
    cfg = hf_config(src)
    d = dims_from_hf(cfg)
    plain = mcore.transformer_config

    def uneven(*args, **kwargs):
        c = plain(*args, **kwargs)
        c.num_layers_in_first_pipeline_stage = first
        return c
    mcore.transformer_config = uneven
    model = mcore.build_gpt(d, torch.bfloat16, layout)
    load_hf_weights(model, HFReader(src), d, layout)
    print(f"rank {coll.rank()} holds layers {sorted(mcore.layer_numbers(model).values())}", flush=True)
    return export(model, cfg, dst, max_shard_size="200KB")


def export_replicated(src: str, dst: str, layout, groups):
    """MLA down-projections held whole on every tp rank, straight through run_export."""
    cfg, reader = hf_config(src), HFReader(src)
    d = dims_from_hf(cfg)
    model = mcore.build_gpt(d, torch.bfloat16, layout)
    load_hf_weights(model, reader, d, layout)
    params = mcore.local_params(model)
    items, styles = [], dict(params.styles)
    for name, t in params:
        if name.endswith(("linear_kv_down_proj.weight", "linear_q_down_proj.weight")):
            layer, leaf = int(name.split(".")[2]), name.split(".")[-2]
            hf = {"linear_kv_down_proj": "kv_a_proj_with_mqa", "linear_q_down_proj": "q_a_proj"}[leaf]
            t = reader.read(f"model.layers.{layer}.self_attn.{hf}.weight")     # whole, on every tp rank
            styles[name] = "replicated"
        items.append((name, t))
    view = RankView(mcore.LocalParams(items, styles), mcore.layer_numbers(model), mcore.num_local_experts(d, layout))
    return run_export(view, d, layout, groups, cfg, dst, ExportOptions(max_shard_size="200KB"))

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
