"""The in-memory stream on one GPU: ``device="cuda"`` yields GPU tensors and ``device="cpu"`` pinned host tensors,
both with the single-process reference's bytes for every tensor of a ragged HF source read into GPU memory, each
name once; the buckets hold the same pairs within their bound. With megatron-core installed, the public
``iter_fp8`` of a Megatron model built on the GPU gives the same bytes.

Runs under pytest, or as ``python3 tests/gpu/test_stream_cuda.py`` where pytest is missing.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, ".."))

from megatron_fp8pb.quant import triton_kernel as bt  # noqa: E402
from megatron_fp8pb.quant.reference import quantize_blockfp8_reference  # noqa: E402

try:
    import pytest
except ImportError:
    pytest = None

if pytest is not None and not (torch.cuda.is_available() and bt.available()):
    pytest.skip("needs CUDA and triton", allow_module_level=True)

SCALE = ".weight_scale_inv"
RAGGED = dict(vocab_size=1003, hidden_size=320, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=80, max_position_embeddings=256)
BUCKET = 300_000


def _reference_bad(pairs, state) -> list[str]:
    bad, names = [], [n for n, _ in pairs]
    for name, t in pairs:
        if name.endswith(SCALE):
            want = quantize_blockfp8_reference(state[name[:-len(SCALE)] + ".weight"])[1]
        elif t.dtype == torch.float8_e4m3fn:
            want = quantize_blockfp8_reference(state[name])[0]
        else:
            want = state[name]
        got = t.cpu()
        if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(
                got.reshape(-1).view(torch.uint8), want.contiguous().reshape(-1).view(torch.uint8)):
            bad.append(name)
    fp8 = {n for n, t in pairs if t.dtype == torch.float8_e4m3fn}
    expected = set(state) | {n[:-len(".weight")] + SCALE for n in fp8}
    if len(set(names)) != len(names) or set(names) != expected:
        bad.append(f"names: {len(names)} given, {len(set(names))} distinct, {len(expected)} expected")
    return bad


def _source(d: str):
    import transformers as tf
    from helpers import write_hf_source
    return write_hf_source(Path(d), tf.LlamaConfig(**RAGGED))


def test_stream_on_gpu_and_to_pinned_host_equal_reference():
    from megatron_fp8pb.config import ParallelConfig, load_config
    from megatron_fp8pb.exporter.options import ExportOptions, RankView
    from megatron_fp8pb.parallel import session
    from megatron_fp8pb.sources.registry import build_source
    from megatron_fp8pb.stream.buckets import bucketed
    from megatron_fp8pb.stream_api import stream_view
    with tempfile.TemporaryDirectory() as d:
        state = _source(d)
        with session.started(ParallelConfig(device="cuda"), megatron=False) as job:
            src = build_source(load_config(None, ["source.kind=hf", f"source.path={d}"]), job.layout, True, True)
            view = RankView.of_source(src, job.layout)
            options = ExportOptions.from_keywords(src.dims, out_dtype=src.dtype)
            cuda = torch.device("cuda", torch.cuda.current_device())
            on_gpu = [(n, t.clone()) for n, t in stream_view(view, src.dims, job, src.hf_config, options, cuda)]
            assert all(t.is_cuda for _, t in on_gpu), [n for n, t in on_gpu if not t.is_cuda][:3]
            assert _reference_bad(on_gpu, state) == []
            host = []
            for n, t in stream_view(view, src.dims, job, src.hf_config, options, torch.device("cpu")):
                assert not t.is_cuda and t.is_pinned(), n
                host.append((n, t))
            assert _reference_bad(host, state) == []
            buckets = list(bucketed(stream_view(view, src.dims, job, src.hf_config, options, cuda), BUCKET))
            flat = [p for b in buckets for p in b]
            assert [n for n, _ in flat] == [n for n, _ in on_gpu] and _reference_bad(flat, state) == []
            assert all(len(b) == 1 or sum(t.numel() * t.element_size() for _, t in b) <= BUCKET for b in buckets)
            assert 1 < len(buckets) < len(flat)


def test_iter_fp8_of_megatron_model_on_gpu():
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        if pytest is not None:
            pytest.skip("megatron-core is not installed")
        print("skipped: megatron-core is not installed")
        return
    from megatron_fp8pb import iter_fp8
    from megatron_fp8pb.config import ParallelConfig, load_config
    from megatron_fp8pb.parallel import session
    from megatron_fp8pb.sources.registry import build_source
    with tempfile.TemporaryDirectory() as d:
        state = _source(d)
        with session.started(ParallelConfig(device="cuda")) as job:
            src = build_source(load_config(None, ["source.kind=hf", f"source.path={d}"]), job.layout, True)
            pairs = [(n, t.clone()) for n, t in iter_fp8(src.model, src.hf_config, device="cuda")]
            assert pairs and all(t.is_cuda for _, t in pairs)
            assert _reference_bad(pairs, state) == []
            _plan_kept_between_calls(src, state)


def _plan_kept_between_calls(src, state) -> None:
    """A second ``iter_fp8`` of the same model reuses the first one's plan; a weight changed in place in between
    shows in its bytes; the cache does not keep the model alive."""
    import weakref
    from megatron_fp8pb import iter_fp8
    from megatron_fp8pb.stream_api import _STREAMS
    (stream,) = _STREAMS[src.model].values()
    plan = stream._plan
    fc2 = dict(src.model.named_parameters())["decoder.layers.1.mlp.linear_fc2.weight"]
    with torch.no_grad():
        fc2.mul_(2)         # exact in bf16
    state = dict(state, **{"model.layers.1.mlp.down_proj.weight": state["model.layers.1.mlp.down_proj.weight"] * 2})
    pairs = [(n, t.clone()) for n, t in iter_fp8(src.model, src.hf_config, device="cuda")]
    assert _reference_bad(pairs, state) == []
    assert list(_STREAMS[src.model].values()) == [stream] and stream._plan is plan
    held = [c.cell_contents for c in stream._views.__closure__]
    assert not any(x is src.model for x in held) and any(isinstance(x, weakref.ref) for x in held)


if __name__ == "__main__":
    test_stream_on_gpu_and_to_pinned_host_equal_reference()
    test_iter_fp8_of_megatron_model_on_gpu()
    print("stream cuda tests passed")
