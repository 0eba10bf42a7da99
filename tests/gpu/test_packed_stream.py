"""The one-process stream (``stream/packed.py``) gives the general export's bytes for every tensor, names and order
of a ragged model, on the GPU (``device="cuda"`` and pinned host tensors) and again after the weights change in
place (the plan kept) or a parameter moves (planned again), with amax and ue8m0 scales; a NaN raises the planner's
message before its tensor is yielded.

On a GPU the general export runs on a CPU copy of the same parameters (the reference's block math). Under
``TRITON_INTERPRET=1`` on the CPU (tests/unit/test_grouped_interpreted.py) the packed path runs on the CPU and its
qdata is compared with ``triton_kernel.quantize`` of the HF tensors, interpreted alike, its scales and unquantized
tensors with the general export's.
"""
from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

from gpu_or_interpreter import INTERPRETED, skip_without_a_kernel_device  # noqa: E402

skip_without_a_kernel_device()

RAGGED = dict(vocab_size=1003, hidden_size=320, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=80, max_position_embeddings=256, torch_dtype="bfloat16")
BAD = "model.layers.1.mlp.down_proj.weight"


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _setup(job, device, scale_fmt="amax"):
    import transformers as tf
    from megatron_fp8pb.archs import dims_from_hf
    from megatron_fp8pb.exporter.options import ExportOptions, RankView
    from megatron_fp8pb.parallel.megatron import num_local_experts
    from megatron_fp8pb.sources.streamed import local_param_shapes, stage_layers
    hfc = tf.LlamaConfig(**RAGGED)
    d = dims_from_hf(hfc)
    g = torch.Generator().manual_seed(0)
    params = [(n, (torch.randn(s, generator=g) * 0.02).bfloat16().to(device))
              for n, s in local_param_shapes(d, job.layout)]
    view = RankView(params, stage_layers(d, job.layout), num_local_experts(d, job.layout))
    return d, hfc, view, ExportOptions.from_keywords(d, out_dtype=torch.bfloat16, scale_fmt=scale_fmt)


def _general(view, d, job, hfc, options):
    """The general export's pairs of a CPU copy of ``view``."""
    from dataclasses import replace
    from megatron_fp8pb.stream_api import stream_view
    cpu = replace(view, params=[(n, p.cpu()) for n, p in view.params])
    return [(n, t.clone()) for n, t in stream_view(cpu, d, job, hfc, options, torch.device("cpu"))]


def _diff(got, want) -> list[str]:
    if [n for n, _ in got] != [n for n, _ in want]:
        return ["names or order"]
    return [n for (n, a), (_, b) in zip(got, want) if a.dtype != b.dtype or a.shape != b.shape
            or _bytes(a) != _bytes(b)]


def _nan_check(stream, view):
    p = dict(view.params)["decoder.layers.1.mlp.linear_fc2.weight"]
    keep = p[7, 11].clone()
    p[7, 11] = float("nan")
    seen = []
    try:
        for n, _ in stream:
            seen.append(n)
        raise AssertionError("no error for a NaN weight")
    except ValueError as e:
        assert f"HF tensor '{BAD}' [320, 704] holds nan at index [7, 11]" in str(e), str(e)
    assert BAD not in seen and seen, seen[-3:]
    p[7, 11] = keep


def check_gpu(scale_fmt: str) -> None:
    from megatron_fp8pb.config import ParallelConfig
    from megatron_fp8pb.parallel import session
    from megatron_fp8pb.stream_api import FP8Stream
    with session.started(ParallelConfig(device="cuda"), megatron=False) as job:
        d, hfc, view, options = _setup(job, job.device, scale_fmt)
        cuda, host = torch.device("cuda", torch.cuda.current_device()), torch.device("cpu")
        on_gpu, to_host = (FP8Stream.of_view(view, d, job, hfc, options, t) for t in (cuda, host))
        want = _general(view, d, job, hfc, options)
        got = [(n, t.clone()) for n, t in on_gpu]
        assert on_gpu._plan[1] is not None and all(t.is_cuda for _, t in got)
        assert _diff(got, want) == []
        pinned = list(to_host)
        assert all(t.is_pinned() for _, t in pinned) and _diff(pinned, want) == []
        plan = on_gpu._plan[1]
        for _, p in view.params:        # new weights in place: the plan is kept, the bytes follow
            p.mul_(1.5)
        assert _diff([(n, t.clone()) for n, t in on_gpu], _general(view, d, job, hfc, options)) == []
        assert on_gpu._plan[1] is plan
        view.params[3] = (view.params[3][0], view.params[3][1].clone())     # a parameter moved: planned again
        assert _diff(list(to_host), _general(view, d, job, hfc, options)) == []
        assert on_gpu._plan[1] is plan and to_host._plan[1] is not plan
        _nan_check(on_gpu, view)
        _nan_check(to_host, view)


def check_interpreted(scale_fmt: str) -> None:
    from dataclasses import replace
    from megatron_fp8pb.config import ParallelConfig
    from megatron_fp8pb.parallel import session
    from megatron_fp8pb.quant import triton_kernel
    from megatron_fp8pb.stream.packed import PackedPlan
    from megatron_fp8pb.stream.sink import IN_FLIGHT_BYTES
    with session.started(ParallelConfig(tp=1, backend="gloo", device="cpu"), megatron=False) as job:
        d, hfc, view, options = _setup(job, torch.device("cpu"), scale_fmt)
        plan = PackedPlan.build(view, d, job.layout, options)
        assert plan is not None
        got = list(plan.run(torch.device("cpu"), IN_FLIGHT_BYTES))
        want = _general(view, d, job, hfc, options)
        hf = dict(_general(view, d, job, hfc, replace(options, quant=replace(options.quant, enabled=False))))
        for k, (n, t) in enumerate(want):
            if t.dtype == torch.float8_e4m3fn:
                want[k] = (n, triton_kernel.quantize(hf[n], scale_fmt=scale_fmt)[0])
        assert _diff(got, want) == []
        _nan_check(plan.run(torch.device("cpu"), 1), view)


def test_packed_stream_amax():
    (check_interpreted if INTERPRETED else check_gpu)("amax")


def test_packed_stream_ue8m0():
    (check_interpreted if INTERPRETED else check_gpu)("ue8m0")


if __name__ == "__main__":
    test_packed_stream_amax()
    test_packed_stream_ue8m0()
    print("packed stream tests passed")
