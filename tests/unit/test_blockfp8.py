import math
import zlib

import pytest
import torch

from megatron_fp8pb.quant.reference import (dequantize_blockfp8, e4m3_error_bound, quantize_blockfp8,
                                     quantize_blockfp8_reference)


def naive(w: torch.Tensor, b: int = 128, scale_fmt: str = "amax"):
    """Per-block Python loop, written straight from FORMAT.md (and its ue8m0 option)."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    s = torch.empty(math.ceil(n / b), math.ceil(k / b), dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * b:(i + 1) * b, j * b:(j + 1) * b].float()
            amax = blk.abs().max()
            scale = float(amax / 448.0) if amax != 0 else 1.0      # float32 quotient, exact as a double
            if scale_fmt == "ue8m0" and amax != 0:
                scale = _pow2_at_least(scale)
            s[i, j] = scale
            div = blk / torch.full_like(blk, scale)     # elementwise true division (a scalar may become a reciprocal)
            q[i * b:(i + 1) * b, j * b:(j + 1) * b] = torch.clamp(div, -448, 448).to(torch.float8_e4m3fn)
    return q, s


def _same(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("shape", [(1, 1), (128, 128), (127, 129), (320, 704), (257, 130), (64, 300)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_reference_matches_naive_loop(shape, dtype):
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, str(dtype))).encode()))
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


# ---- scale_fmt "ue8m0": power-of-two scales ------------------------------------------------------------------

def _pow2_at_least(x: float) -> float:
    """The least power of two >= x > 0, by doubling from the smallest float32 subnormal (exact in double)."""
    p = 2.0 ** -149
    while p < x:
        p *= 2
    return p


def naive_ue8m0(w: torch.Tensor, b: int = 128):
    return naive(w, b, "ue8m0")


def _is_pow2(s: torch.Tensor) -> bool:
    m, _ = torch.frexp(s.double())
    return bool((m == 0.5).all())


@pytest.mark.parametrize("shape", [(1, 1), (128, 128), (127, 129), (320, 704), (257, 130)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_ue8m0_reference_matches_naive_loop(shape, dtype):
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, str(dtype), "ue8m0")).encode()))
    w = (torch.randn(shape, generator=g) * 3).to(dtype)
    q, s = quantize_blockfp8_reference(w, scale_fmt="ue8m0")
    qn, sn = naive_ue8m0(w)
    assert s.dtype == torch.float32 and _is_pow2(s)
    assert _same(q, qn) and torch.equal(s, sn)
    assert _same(*[quantize_blockfp8(w, scale_fmt="ue8m0")[0], q])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ue8m0_at_just_above_and_below_powers_of_two(dtype):
    """amax = 448 * 2^k keeps scale 2^k exactly; the next value up goes to 2^(k+1), the next down stays 2^k."""
    ks = [-20, -3, 0, 1, 7, 30]
    w = torch.zeros(128 * 3, 128 * len(ks), dtype=dtype)
    for j, k in enumerate(ks):
        at = torch.tensor(448.0 * 2.0 ** k, dtype=dtype)
        up = torch.nextafter(at, torch.tensor(math.inf, dtype=dtype)) if dtype == torch.float32 else \
            (at.float() * (1 + 2 ** -7)).to(dtype)
        down = torch.nextafter(at, torch.tensor(0.0, dtype=dtype)) if dtype == torch.float32 else \
            (at.float() * (1 - 2 ** -8)).to(dtype)
        assert up > at > down
        for i, v in enumerate((at, up, down)):
            blk = w[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)]
            blk.copy_(torch.linspace(-1, 1, 128 * 128).reshape(128, 128) * 0.5 * float(v))
            blk[3, 5] = -v
    q, s = quantize_blockfp8_reference(w, scale_fmt="ue8m0")
    qn, sn = naive_ue8m0(w)
    assert _same(q, qn) and torch.equal(s, sn)
    for j, k in enumerate(ks):
        assert s[0, j] == 2.0 ** k and s[1, j] == 2.0 ** (k + 1) and s[2, j] == 2.0 ** k, (k, s[:, j])
        assert q[3, 128 * j + 5].float() == -448.0          # the amax block element lands on -448 exactly
    assert q.float().abs().max() <= 448


def test_ue8m0_zero_and_subnormal_blocks():
    w = torch.randn(128 * 2, 128 * 4, generator=torch.Generator().manual_seed(11))
    w[:128, :128] = 0                                   # all zero -> 1.0
    w[128:, :128] = -0.0                                # negative zeros too
    w[:128, 128:256] *= 1e-39 / w[:128, 128:256].abs().max()     # amax itself subnormal
    w[128:, 128:256] *= 3e-37 / w[128:, 128:256].abs().max()     # amax normal, amax/448 subnormal
    w[:128, 256:384] = 0
    w[7, 300] = 2.0 ** -149                             # the smallest subnormal as the block's amax: amax/448
    #                                                     underflows to 0 in float32, the scale is 2^-149
    w[128:, 256:384] *= 448.0 * 2.0 ** -140 / w[128:, 256:384].abs().max()   # amax/448 an exact subnormal pow2
    w[:128, 384:] *= 2.0 ** -126 * 448 * 1.5 / w[:128, 384:].abs().max()    # amax/448 just above smallest normal
    q, s = quantize_blockfp8_reference(w, scale_fmt="ue8m0")
    qn, sn = naive_ue8m0(w)
    assert _same(q, qn) and torch.equal(s, sn)
    assert s[0, 0] == 1.0 and s[1, 0] == 1.0 and (q[:, :128].float() == 0).all()
    assert s[0, 2] == 2.0 ** -149 and s[1, 2] == 2.0 ** -140 and s[0, 3] == 2.0 ** -125
    assert _is_pow2(s) and q.float().abs().max() <= 448
    w[128:, 384:] *= 448.0 * 2.0 ** -149 / w[128:, 384:].abs().max()       # amax/448 exactly the least subnormal
    q, s = quantize_blockfp8_reference(w, scale_fmt="ue8m0")
    assert _same(q, naive_ue8m0(w)[0]) and s[1, 3] == 2.0 ** -149
    for dtype in (torch.bfloat16, torch.float16):
        wd = w.to(dtype)
        assert torch.equal(quantize_blockfp8_reference(wd, scale_fmt="ue8m0")[1], naive_ue8m0(wd)[1])


def test_pow2_ceil_over_random_bit_patterns():
    from megatron_fp8pb.quant.blockmath import pow2_ceil
    g = torch.Generator().manual_seed(5)
    bits = torch.randint(1, 0x7F000000, (4000,), generator=g, dtype=torch.int32)
    bits[:1000] = torch.randint(1, 0x800000, (1000,), generator=g, dtype=torch.int32)     # subnormals
    bits[1000:1100] = (torch.arange(1, 101, dtype=torch.int32) + 20) << 23                  # exact powers of two
    x = bits.view(torch.float32)
    got = pow2_ceil(x)
    assert [_pow2_at_least(v) for v in x.tolist()] == got.tolist()
    assert torch.equal(got[1000:1100], x[1000:1100])
    assert pow2_ceil(torch.zeros(2)).tolist() == [2.0 ** -149] * 2       # the least float32 power of two


def test_ue8m0_dequant_within_bound_and_default_unchanged():
    w = torch.randn(333, 517, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    q, s = quantize_blockfp8(w, scale_fmt="ue8m0")
    back = dequantize_blockfp8(q, s, dtype=torch.float32)
    assert ((back - w.float()).abs() <= e4m3_error_bound(s, w.shape) * (1 + 1e-5)).all()
    qa, sa = quantize_blockfp8(w)
    qd, sd = quantize_blockfp8(w, scale_fmt="amax")
    assert _same(qa, qd) and torch.equal(sa, sd) and torch.equal(sa, naive(w)[1])
    assert (s >= sa).all() and (s < 2 * sa).all()


def test_unknown_scale_fmt_is_an_error():
    with pytest.raises(ValueError, match=r"scale_fmt='e8m0'.*amax, ue8m0"):
        quantize_blockfp8(torch.ones(3, 3), scale_fmt="e8m0")
