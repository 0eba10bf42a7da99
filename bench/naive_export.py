"""The baseline every benchmark compares against: gather bf16 to rank 0, quantize there, save_file.

What a straightforward exporter does: every rank sends its bf16 shards to rank 0's host memory, rank 0 reassembles
each full HF tensor, quantizes it with the reference quantizer on the CPU, keeps the whole state dict, and saves it
with huggingface_hub's shard splitter and ``safetensors.torch.save_file``. The Megatron -> HF name mapping is shared
with the product so that only the data path differs.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_fp8pb.parallel import collectives as coll  # noqa: E402
from megatron_fp8pb.archs import rules_for  # noqa: E402
from megatron_fp8pb.quant.reference import quantize_blockfp8_reference  # noqa: E402
from megatron_fp8pb.output.hf_files import config_json, quantization_config  # noqa: E402
from megatron_fp8pb.exporter.pipeline import make_plans  # noqa: E402
from megatron_fp8pb.plan.tp_slices import piece_dtype  # noqa: E402
from megatron_fp8pb.exporter.options import ExportOptions, RankView  # noqa: E402
from megatron_fp8pb.plan.params import Piece, PlanContext, check_coverage, expected_tensors  # noqa: E402
from megatron_fp8pb.plan.tp_slices import pieces_of  # noqa: E402


def naive_export(view: RankView, d, layout, groups, hf_config, out_dir, options: ExportOptions) -> coll.Traffic:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    traffic = coll.Traffic()
    me = coll.rank()
    quant, max_shard_size, out_dtype = options.quant, options.max_shard_size, options.out_dtype or torch.bfloat16
    plans = make_plans(view, PlanContext.make(d, layout, quant, view.layer_of_local, view.num_local_experts))
    mine = [(Piece(**{**p.__dict__, "src": me}), t) for plan, local in plans
            for p, t in zip(plan.pieces, pieces_of(plan, local, d))]
    mine.sort(key=lambda pt: pt[0].order)
    everyone = coll.gather_objects([p for p, _ in mine])
    if me != 0:
        for p, t in mine:
            if p.length:
                coll.send_tensor(t.to(piece_dtype(p, out_dtype)), 0, traffic, groups.device)
        return traffic
    local = {(p.hf_name, p.offset): t for p, t in mine}
    by_name = check_coverage([p for pieces in everyone for p in pieces], expected_tensors(rules_for(d), d))
    state = {}
    for name, pieces in sorted(by_name.items(), key=lambda kv: kv[1][0].order):
        dtype = piece_dtype(pieces[0], out_dtype)     # the float32 expert bias keeps its dtype
        full = torch.empty(pieces[0].full_shape, dtype=dtype)
        for p in pieces:
            shape = list(p.full_shape)
            shape[p.dim] = p.length
            t = local[(name, p.offset)].to(dtype).cpu() if p.src == 0 else \
                coll.recv_tensor(tuple(shape), dtype, p.src, traffic, groups.device)
            full.narrow(p.dim, p.offset, p.length).copy_(t)
        if pieces[0].quantize:
            q, s = quantize_blockfp8_reference(full, name=name)
            state[name], state[name[:-len(".weight")] + ".weight_scale_inv"] = q, s
        else:
            state[name] = full
    os.makedirs(out_dir, exist_ok=True)
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for fname, names in split.filename_to_tensors.items():
        save_file({n: state[n].contiguous() for n in names}, os.path.join(out_dir, fname), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        Path(out_dir, "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    quantized = sorted({n[:-len(".weight")] for n, pieces in by_name.items() if pieces[0].quantize})
    Path(out_dir, "config.json").write_bytes(config_json(hf_config, d.vocab, d.tie_embeddings, out_dtype,
                                                         quantization_config(["lm_head"], bool(quantized))))
    return traffic
