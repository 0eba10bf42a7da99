"""torchrun worker for tests of what a training job hands the in-process API:

``vpp``: model chunks of an interleaved (virtual) pipeline, a list per rank;
``replicated``: MLA down-projections held whole on every tp rank (as TransformerEngine's duplicated TELinear holds
them), quantized by the rank that writes them with no collective."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from megatron_fp8pb import collectives as coll, export, mcore  # noqa: E402
from megatron_fp8pb.archs import dims_from_hf  # noqa: E402
from megatron_fp8pb.hf_source import HFReader, hf_config  # noqa: E402
from megatron_fp8pb.options import ExportOptions, RankView  # noqa: E402
from megatron_fp8pb.pipeline import run_export  # noqa: E402
from megatron_fp8pb.sources import load_hf_weights  # noqa: E402


def main(mode: str, src: str, dst: str, tp: int, pp: int, vp: int) -> None:
    mcore.init_distributed("gloo", 120)
    mcore.initialize_parallel(tp, pp, vp=vp or None)
    layout, groups = mcore.layout_and_groups()
    cfg = hf_config(src)
    d = dims_from_hf(cfg)
    reader = HFReader(src)
    if mode == "vpp":
        chunks = [mcore.build_gpt(d, torch.bfloat16, layout, vp_stage=k) for k in range(vp)]
        load_hf_weights(chunks, reader, d, layout)
        result = export(chunks, cfg, dst, max_shard_size="200KB")
    else:
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
        view = RankView(mcore.LocalParams(items, styles), mcore.layer_numbers(model),
                        mcore.num_local_experts(d, layout))
        result = run_export(view, d, layout, groups, cfg, dst, ExportOptions(max_shard_size="200KB"))
    if coll.rank() == 0:
        print(f"CHUNKS_OK tensors={result.num_tensors} traffic={result.traffic.__dict__}")
    coll.barrier()
    mcore.destroy_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
