import math

import pytest
import torch

from megatron_fp8pb.blockfp8 import (dequantize_blockfp8, e4m3_error_bound, quantize_blockfp8,
                                     quantize_blockfp8_reference)


def naive(w: torch.Tensor, b: int = 128):
    """Per-block Python loop, written straight from FORMAT.md."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    s = torch.empty(math.ceil(n / b), math.ceil(k / b), dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * b:(i + 1) * b, j * b:(j + 1) * b].float()
            amax = blk.abs().max()
            scale = amax / 448.0 if amax != 0 else torch.tensor(1.0)
            s[i, j] = scale
            q[i * b:(i + 1) * b, j * b:(j + 1) * b] = torch.clamp(blk / scale, -448, 448).to(torch.float8_e4m3fn)
    return q, s


def _same(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("shape", [(1, 1), (128, 128), (127, 129), (320, 704), (257, 130), (64, 300)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_reference_matches_naive_loop(shape, dtype):
    g = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    w = (torch.randn(shape, generator=g) * 3).to(dtype)
    q, s = quantize_blockfp8(w)
    qn, sn = naive(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert s.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    assert _same(q, qn) and torch.equal(s, sn)


def test_zero_blocks_and_extremes():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(300, 260, generator=g)
    w[:128, :128] = 0                       # an all-zero block -> scale 1.0
    w[128:256, 128:256] *= 1e-30            # subnormal range next to normal blocks
    w[5, 200] = 448.0 * 3                   # the block amax itself
    w[6, 201] = -448.0 * 3 * (1 - 2**-5)    # just under the amax
    w[256:, :] = torch.tensor(1e4)          # constant block: every value is the amax
    w = w.to(torch.bfloat16)
    q, s = quantize_blockfp8(w)
    qn, sn = naive(w)
    assert _same(q, qn) and torch.equal(s, sn)
    assert s[0, 0] == 1.0 and (q[:128, :128].float() == 0).all()
    assert q.float().abs().max() <= 448


def test_dequant_within_e4m3_bound():
    w = torch.randn(333, 517, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    q, s = quantize_blockfp8(w)
    back = dequantize_blockfp8(q, s, dtype=torch.float32)
    assert ((back - w.float()).abs() <= e4m3_error_bound(s, w.shape) * (1 + 1e-5)).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_is_an_error_naming_the_tensor_and_index(bad):
    w = torch.zeros(200, 130)
    w[150, 7] = bad
    with pytest.raises(ValueError, match=r"model.layers.3.mlp.up_proj.weight.*\(150, 7\)"):
        quantize_blockfp8(w, name="model.layers.3.mlp.up_proj.weight")


def test_refuses_non_2d():
    with pytest.raises(TypeError, match="2-D"):
        quantize_blockfp8_reference(torch.ones(4), name="bias")


def test_dequant_rejects_wrong_scale_shape():
    q, s = quantize_blockfp8(torch.randn(200, 200))
    with pytest.raises(ValueError, match="scale_inv shape"):
        dequantize_blockfp8(q, s[:1])
