"""Reading an HF source straight into GPU memory (``device_reads``) gives the host reader's bytes for every slice
kind, and the plain torch quantizer that runs while the Triton kernel compiles gives the kernel's bytes.

Runs under pytest, or as ``python3 tests/gpu/test_device_reads.py`` where pytest is missing.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from megatron_fp8pb.quant import triton_kernel as bt  # noqa: E402
from megatron_fp8pb.sources import device_reads  # noqa: E402
from megatron_fp8pb.quant.reference import quantize_checked  # noqa: E402
from megatron_fp8pb.sources.hf import HFReader  # noqa: E402

try:
    import pytest
except ImportError:
    pytest = None

if pytest is not None and not (torch.cuda.is_available() and bt.available()):
    pytest.skip("needs CUDA and triton", allow_module_level=True)


def _source(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(3)
    tensors = {
        "big": torch.randn(3001, 2053, generator=g).to(torch.bfloat16),     # many ring chunks, odd sizes
        "f32": torch.randn(517, 259, generator=g),
        "vec": torch.randn(4099, generator=g).to(torch.bfloat16),
        "cube": torch.randn(5, 300, 7, generator=g).to(torch.bfloat16),
        "empty": torch.empty(0, 16, dtype=torch.bfloat16),
    }
    save_file(tensors, str(path / "model.safetensors"))
    return tensors


def test_device_reads_equal_host_reads():
    with tempfile.TemporaryDirectory() as d:
        tensors = _source(Path(d))
        dev = torch.device("cuda", torch.cuda.current_device())
        host, gpu = HFReader(d), HFReader(d, device=dev)
        gpu._ring = device_reads.PinnedRing(3, 1 << 20)      # fewer buffers than chunks in flight: they are reused
        try:
            for name, t in tensors.items():
                cases = [(0, 0, None)]
                if t.dim() >= 1 and t.shape[0] > 10:
                    cases += [(0, 7, t.shape[0] - 20)]
                if t.dim() >= 2 and t.shape[1] > 10:
                    cases += [(1, 3, t.shape[1] - 9), (1, 0, 1)]
                for dim, offset, length in cases:
                    want = host.read(name, dim, offset, length)
                    got = gpu.read(name, dim, offset, length)
                    assert got.is_cuda and got.dtype == want.dtype and got.shape == want.shape, (name, dim, offset)
                    assert torch.equal(got.cpu(), want), (name, dim, offset, length)
            assert gpu.bytes_read == host.bytes_read
        finally:
            host.close()
            gpu.close()


def test_device_reads_wait_for_work_queued_on_the_destination():
    """A destination whose memory was just freed by work still queued on the caller's stream is written only
    after that work (the copy stream waits on it)."""
    with tempfile.TemporaryDirectory() as d:
        tensors = _source(Path(d))
        dev = torch.device("cuda", torch.cuda.current_device())
        gpu = HFReader(d, device=dev)
        try:
            for _ in range(3):
                x = torch.ones(3001, 2053, dtype=torch.bfloat16, device=dev)
                for _ in range(50):
                    x.mul_(1.0)      # queued work on memory the allocator hands to the next read
                del x
                assert torch.equal(gpu.read("big").cpu(), tensors["big"])
        finally:
            gpu.close()


def test_a_failed_read_names_the_tensor_and_gives_every_buffer_back():
    with tempfile.TemporaryDirectory() as d:
        tensors = _source(Path(d))
        f = Path(d) / "model.safetensors"
        gpu = HFReader(d, device=torch.device("cuda", torch.cuda.current_device()))
        gpu._ring = device_reads.PinnedRing(3, 1 << 20)
        try:
            gpu.meta("big")                     # the header is read while the file is whole
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size - (1 << 20))
            failed = []
            for name in tensors:
                try:
                    gpu.read(name)
                except ValueError as e:
                    assert name in str(e) and "truncated" in str(e)
                    failed.append(name)
            assert failed                       # the tensors in the lost last MiB
            assert gpu._ring._free.qsize() == 3
        finally:
            gpu.close()


def test_torch_path_on_the_gpu_equals_the_kernel():
    """While ``warm_up`` compiles, ``quantize_checked`` takes the plain torch path on the GPU: same bytes."""
    g = torch.Generator(device="cuda").manual_seed(5)
    for shape in [(4096, 4096), (1000, 333), (129, 4097)]:
        w = (torch.randn(shape, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
        q_kernel, s_kernel = bt.quantize(w)
        old = bt._warming
        try:
            bt._warming = _Alive()
            assert not bt.usable(w)
            q_torch, s_torch = quantize_checked(w)
        finally:
            bt._warming = old
        assert torch.equal(s_torch, s_kernel), shape
        assert torch.equal(q_torch.view(torch.uint8), q_kernel.view(torch.uint8)), shape


def test_torch_path_of_sharded_pieces_on_the_gpu_equals_the_reference():
    """The pieces of a sharded tensor (any offset, not a multiple of 128) take ``blockmath`` on the GPU while the
    kernel compiles: block amax and quantized bytes equal the CPU reference's."""
    from megatron_fp8pb.quant import blockmath
    g = torch.Generator().manual_seed(11)
    full = (torch.randn(1200, 333, generator=g) * 0.02).to(torch.bfloat16)
    scale_inv = blockmath.scale_inv_from_amax(blockmath.partial_block_amax(full, 0, 0))
    for dim in (0, 1):
        for offset, n in [(0, 1), (5, 123), (128, 128), (261, 300), (700, 333 if dim else 500)]:
            if offset + n > full.shape[dim]:
                continue
            piece = full.narrow(dim, offset, n)
            want_amax = blockmath.partial_block_amax(piece, dim, offset)
            got_amax = blockmath.partial_block_amax(piece.cuda(), dim, offset)
            assert torch.equal(got_amax.cpu(), want_amax), (dim, offset, n)
            want = blockmath.quantize_piece(piece, scale_inv, dim, offset)
            got = blockmath.quantize_piece(piece.cuda(), scale_inv.cuda(), dim, offset)
            assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8)), (dim, offset, n)


class _Alive:
    def is_alive(self) -> bool:
        return True


def test_warm_up_compiles_in_the_background():
    dev = torch.device("cuda", torch.cuda.current_device())
    old = bt._warming
    try:
        bt._warming = None
        bt.warm_up(dev)
        assert bt._warming is not None
        bt._warming.join(timeout=300)
        assert bt.ready() and bt.usable(torch.ones(1, device=dev))
    finally:
        bt._warming = old


if __name__ == "__main__":
    test_device_reads_equal_host_reads()
    test_device_reads_wait_for_work_queued_on_the_destination()
    test_a_failed_read_names_the_tensor_and_gives_every_buffer_back()
    test_torch_path_on_the_gpu_equals_the_kernel()
    test_torch_path_of_sharded_pieces_on_the_gpu_equals_the_reference()
    test_warm_up_compiles_in_the_background()
    print("ok")
