"""The Triton block-FP8 path is byte-identical to the plain torch reference (run on CPU copies), in both scale
formats (amax/448, and ue8m0: rounded up to a power of two).

Runs under pytest, or as ``python3 tests/gpu/test_blockfp8_triton.py`` where pytest is missing.
"""
from __future__ import annotations

import os
import sys
import zlib

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from megatron_fp8pb.quant import triton_kernel as bt  # noqa: E402
from megatron_fp8pb.quant import blockmath  # noqa: E402
from megatron_fp8pb.quant.reference import quantize_blockfp8, quantize_blockfp8_reference  # noqa: E402

try:
    import pytest
except ImportError:
    pytest = None

if pytest is not None and not (torch.cuda.is_available() and bt.available()):
    pytest.skip("needs CUDA and triton", allow_module_level=True)


def _params(name, values):
    def deco(f):
        f.cases = (name, values)
        return f if pytest is None else pytest.mark.parametrize(name, values)(f)
    return deco


SHAPES = [(1, 1), (127, 129), (320, 704), (1003, 384), (4096, 4096), (129, 1), (1, 1000)]
LEADS = [0, 1, 64, 127]


def _gen(case) -> torch.Generator:
    """A fresh generator per case, seeded from the case itself (reproducible, different for every case)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def _randn(shape, dtype, case, std=0.02) -> torch.Tensor:
    return (torch.randn(shape, generator=_gen(case)) * std).to(dtype)


def _assert_q_equal(q: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert q.dtype == torch.float8_e4m3fn and q.shape == ref.shape, (what, q.dtype, q.shape, ref.shape)
    a, b = q.cpu().view(torch.uint8), ref.view(torch.uint8)
    if not torch.equal(a, b):
        bad = (a != b).nonzero()
        i, j = bad[0].tolist()
        raise AssertionError(f"{what}: {len(bad)} fp8 bytes differ, first at {(i, j)}: "
                             f"triton {a[i, j].item():#04x} reference {b[i, j].item():#04x}")


def _assert_f32_equal(s: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    s = s.cpu()
    assert s.dtype == torch.float32 and s.shape == ref.shape, (what, s.dtype, s.shape, ref.shape)
    assert torch.equal(s, ref), f"{what}: {(s != ref).sum().item()} float32 values differ"


def _check_full(w: torch.Tensor, what: str, scale_fmt: str = "amax") -> None:
    rq, rs = quantize_blockfp8_reference(w.cpu(), scale_fmt=scale_fmt)
    q, s = bt.quantize(w.cuda(), scale_fmt=scale_fmt)
    _assert_f32_equal(s, rs, f"{what} scale_inv")
    _assert_q_equal(q, rq, f"{what} qdata")


@_params("shape", SHAPES)
def test_random_bf16(shape):
    _check_full(_randn(shape, torch.bfloat16, ("bf16", shape)), f"bf16 {shape}")


@_params("shape", SHAPES)
def test_random_fp32(shape):
    _check_full(_randn(shape, torch.float32, ("fp32", shape)), f"fp32 {shape}")


@_params("shape", [(127, 129), (1003, 384)])
def test_random_fp16(shape):
    _check_full(_randn(shape, torch.float16, ("fp16", shape)), f"fp16 {shape}")


@_params("dtype", [torch.bfloat16, torch.float32])
def test_zero_blocks(dtype):
    w = _randn((300, 400), dtype, ("zero", dtype))
    w[:128, :128] = 0
    w[256:, 384:] = 0
    w[128:256, 128:256] = -0.0
    _check_full(w, f"zero blocks {dtype}")
    _check_full(torch.zeros(200, 130, dtype=dtype), f"all zero {dtype}")


def _extreme(dtype, case) -> torch.Tensor:
    g = _gen(case)
    w = torch.randn(384, 512, generator=g) * 0.02
    w[0:128, 0:128] = torch.randn(128, 128, generator=g) * 1e-30
    w[5, 7] = 3.0
    w[9, 11] = -3.0
    w[10:20, 0:128] = 3.0 * torch.sign(torch.randn(10, 128, generator=g))
    w[0:128, 128:256] = torch.empty(128, 128).uniform_(-1e-30, 1e-30, generator=g)
    w[0, 128] = 100.0
    grid = torch.tensor([2.0 ** e * (1 + m / 16) for e in range(-10, 9) for m in range(16)])
    grid = grid[grid <= 448]
    w[128:256, 0:128] = (grid[torch.randint(len(grid), (128, 128), generator=g)]
                         * torch.sign(torch.randn(128, 128, generator=g)))
    w[128, 0] = 448.0
    w[128:256, 128:256] = torch.randn(128, 128, generator=g) * 1e-6
    w[200, 200] = 1.0
    amax = 0.37
    scale = torch.tensor(amax) / 448.0
    near = torch.tensor([447.9, 447.99, 448.0, 240.0, 232.0, 0.0009765625, 0.001953125, 0.0029296875, 0.015625])
    w[256:384, 0:128] = (near[torch.randint(len(near), (128, 128), generator=g)] * scale
                         * torch.sign(torch.randn(128, 128, generator=g)))
    w[256, 0] = amax
    if dtype == torch.float32:
        w[256:384, 256:384] = torch.randn(128, 128, generator=g) * 1e-39
        w[300, 300] = 1e-38
    return w.to(dtype)


@_params("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_extreme_values(dtype):
    w = _extreme(dtype, ("extreme", dtype))
    _check_full(w, f"extreme {dtype}")
    _check_full(-w, f"extreme negated {dtype}")


def test_non_contiguous():
    base = _randn((512, 700), torch.bfloat16, "noncontig")
    _check_full(base[:, 50:450], "column slice (row stride 700)")
    _check_full(base[:300].t(), "transposed")
    _check_full(base[::2], "every other row")


def test_public_dispatch():
    w = _randn((257, 300), torch.bfloat16, "dispatch")
    rq, rs = quantize_blockfp8_reference(w)
    q, s = quantize_blockfp8(w.cuda())
    _assert_f32_equal(s, rs, "quantize_blockfp8 scale_inv")
    _assert_q_equal(q, rq, "quantize_blockfp8 qdata")


@_params("lead", LEADS)
def test_pieces(lead):
    """Pieces at offset % 128 == lead: block_amax == partial_block_amax, quantize_rows == quantize_piece."""
    for dtype in (torch.bfloat16, torch.float32):
        full = _randn((1200, 333), dtype, ("pieces", lead, dtype))
        scale_inv = blockmath.scale_inv_from_amax(blockmath.partial_block_amax(full, 0, 0))
        for first, n in [(0, 1), (0, 127 - lead or 1), (1, 128), (2, 300), (3, 5), (4, 1200 - 512 - lead)]:
            offset = first * 128 + lead
            piece = full[offset:offset + n]
            what = f"lead {lead} offset {offset} n {n} {dtype}"
            _assert_f32_equal(bt.block_amax(piece.cuda(), lead), blockmath.partial_block_amax(piece, 0, offset),
                              f"{what} block_amax")
            f, rows = blockmath.scale_rows_of_piece(scale_inv, 0, offset, n)
            assert f == first
            _assert_q_equal(bt.quantize_rows(piece.cuda(), rows.cuda(), lead),
                            blockmath.quantize_piece(piece, scale_inv, 0, offset), f"{what} quantize_rows")


# ---- scale_fmt "ue8m0" ------------------------------------------------------------------------------------------

def _assert_pow2(s: torch.Tensor, what: str) -> None:
    m, _ = torch.frexp(s.cpu().double())
    assert bool((m == 0.5).all()), f"{what}: a scale is not a power of two"


@_params("shape", [(1, 1), (127, 129), (320, 704), (1003, 384), (4096, 4096), (129, 1)])
def test_ue8m0_random(shape):
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        w = _randn(shape, dtype, ("ue8m0", shape, dtype))
        _check_full(w, f"ue8m0 {dtype} {shape}", "ue8m0")
        _assert_pow2(bt.quantize(w.cuda(), scale_fmt="ue8m0")[1], f"ue8m0 {dtype} {shape}")


@_params("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_ue8m0_extreme_values_and_zero_blocks(dtype):
    w = _extreme(dtype, ("ue8m0 extreme", dtype))
    _check_full(w, f"ue8m0 extreme {dtype}", "ue8m0")
    _check_full(-w, f"ue8m0 extreme negated {dtype}", "ue8m0")
    z = _randn((300, 400), dtype, ("ue8m0 zero", dtype))
    z[:128, :128] = 0
    z[128:256, 128:256] = -0.0
    _check_full(z, f"ue8m0 zero blocks {dtype}", "ue8m0")
    _check_full(torch.zeros(200, 130, dtype=dtype), f"ue8m0 all zero {dtype}", "ue8m0")


def _pow2_edges(dtype, underflow: bool = True) -> torch.Tensor:
    """Blocks whose amax is 448 * 2^k, the next value up and the next down, for several k; in float32 also blocks
    whose amax/448 is subnormal and (``underflow``) one where it underflows to 0 (ue8m0 scale 2^-149; in the amax
    format its scale is 0 and the block's bytes are NaN in the reference, so that block is left out there)."""
    ks = [-20, -3, 0, 1, 7] + ([30, -100, -130] if dtype == torch.float32 else [])
    w = torch.zeros(128 * 3, 128 * (len(ks) + 1))
    fill = torch.linspace(-1, 1, 128 * 128).reshape(128, 128) * 0.5
    for j, k in enumerate(ks):
        at = torch.tensor(448.0 * 2.0 ** k, dtype=dtype)
        up = torch.nextafter(at, torch.tensor(float("inf"), dtype=dtype))
        down = torch.nextafter(at, torch.tensor(0.0, dtype=dtype))
        for i, v in enumerate((at, up, down)):
            w[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)] = fill * float(v)
            w[128 * i + 3, 128 * j + 5] = -float(v)
    if dtype == torch.float32:
        j = 128 * len(ks)
        w[0, j] = 2.0 ** -149 if underflow else 0.0   # amax/448 underflows: ue8m0 scale 2^-149
        w[128:256, j:j + 128] = fill * 1e-39        # subnormal amax
        w[256:384, j:j + 128] = fill * 3e-37        # normal amax, subnormal amax/448
    return w.to(dtype)


@_params("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_ue8m0_power_of_two_edges(dtype):
    w = _pow2_edges(dtype)
    _check_full(w, f"ue8m0 edges {dtype}", "ue8m0")
    _check_full(_pow2_edges(dtype, underflow=False), f"amax edges {dtype}")


def test_ue8m0_public_dispatch():
    w = _randn((257, 300), torch.bfloat16, "ue8m0 dispatch")
    rq, rs = quantize_blockfp8_reference(w, scale_fmt="ue8m0")
    q, s = quantize_blockfp8(w.cuda(), scale_fmt="ue8m0")
    _assert_f32_equal(s, rs, "quantize_blockfp8 ue8m0 scale_inv")
    _assert_q_equal(q, rq, "quantize_blockfp8 ue8m0 qdata")


@_params("lead", LEADS)
def test_ue8m0_pieces(lead):
    """The sharded-piece path in ue8m0: block_amax on the GPU, scale_inv_from_amax(..., "ue8m0") on the GPU grid,
    quantize_rows; equal to the reference's scales and bytes."""
    for dtype in (torch.bfloat16, torch.float32):
        full = _randn((1200, 333), dtype, ("ue8m0 pieces", lead, dtype))
        rq, rs = quantize_blockfp8_reference(full, scale_fmt="ue8m0")
        grid = torch.zeros(rs.shape, dtype=torch.float32, device="cuda")
        cuts = [(0, 128 + lead), (128 + lead, 300), (428 + lead, 1), (429 + lead, 1200 - 429 - lead)]
        for off, n in cuts:
            a = bt.block_amax(full[off:off + n].cuda(), off % 128)
            first, last = blockmath.block_span(off, n, 128)
            grid[first:last] = torch.maximum(grid[first:last], a)
        scale_inv = blockmath.scale_inv_from_amax(grid, "ue8m0")
        _assert_f32_equal(scale_inv, rs, f"ue8m0 lead {lead} {dtype} scales from GPU amax")
        qs = []
        for off, n in cuts:
            _, rows = blockmath.scale_rows_of_piece(scale_inv, 0, off, n)
            qs.append(bt.quantize_rows(full[off:off + n].cuda(), rows, off % 128))
        _assert_q_equal(torch.cat(qs), rq, f"ue8m0 lead {lead} {dtype} quantize_rows")


def test_scale_from_amax_on_the_gpu_is_the_reference_quotient():
    """The sharded-piece path divides the all-reduced amax grid on the GPU: every float32 amax, over the whole
    exponent range, must give the CPU reference's scale bit for bit (CUDA computes ``x / python_scalar`` as
    ``x * float32(1 / scalar)``: on the CPU that emulation is one ulp off for 53% of these values)."""
    g = torch.Generator().manual_seed(11)
    bits = torch.randint(0, 0x7F800000, (1 << 20,), generator=g, dtype=torch.int32)
    amax = bits.view(torch.float32)
    for scale_fmt in ("amax", "ue8m0"):
        want = blockmath.scale_inv_from_amax(amax, scale_fmt)
        got = blockmath.scale_inv_from_amax(amax.cuda(), scale_fmt).cpu()
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), scale_fmt


if __name__ == "__main__":
    if not (torch.cuda.is_available() and bt.available()):
        print("skipped: needs CUDA and triton")
        sys.exit(0)
    passed = failed = 0
    for name, fn in list(globals().items()):
        if not (name.startswith("test_") and callable(fn)):
            continue
        arg, values = getattr(fn, "cases", (None, [None]))
        for v in values:
            label = f"{name}[{v}]" if arg else name
            try:
                fn(v) if arg else fn()
                passed += 1
                print("PASS", label)
            except Exception as e:
                failed += 1
                print("FAIL", label, type(e).__name__, e)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)

