"""The grouped quantizer (``quant/grouped.py``) gives the reference's bytes for every weight of a group in one
launch: ragged shapes, a one-row and a one-column weight, the q/k/v rows of a fused linear_qkv read in place,
amax and ue8m0 scales; a NaN or an Inf gives a non-finite scale in its block only.

Runs on a GPU against the reference, or on the CPU under ``TRITON_INTERPRET=1`` (tests/unit/test_grouped_interpreted.py
runs it so), where the qdata is compared with ``triton_kernel.quantize`` interpreted alike (the interpreter's e4m3
cast is not the GPU's) and the scales with the reference.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from megatron_fp8pb.quant.grouped import Table  # noqa: E402
from megatron_fp8pb.quant.reference import quantize_blockfp8_reference  # noqa: E402

from gpu_or_interpreter import INTERPRETED, skip_without_a_kernel_device  # noqa: E402

skip_without_a_kernel_device()
DEVICE = "cpu" if INTERPRETED else "cuda"


def _align(n: int) -> int:
    return -(-n // 256) * 256


def _packed(views, scale_fmt):
    """Quantize ``views`` in one launch -> [(qdata, scale_inv)] views of the packed buffer."""
    shapes = [(v.shape[0] * v.shape[1], v.shape[2]) if v.dim() == 3 else tuple(v.shape) for v in views]
    q_offs, s_offs, at = [], [], 0
    for n, k in shapes:
        q_offs.append(at)
        at = _align(at + n * k)
    for n, k in shapes:
        s_offs.append(at // 4)
        at = _align(at + 4 * (-(-n // 128)) * (-(-k // 128)))
    packed = torch.zeros(at, dtype=torch.uint8, device=DEVICE)
    Table(views, q_offs, s_offs, scale_fmt).launch(packed)
    out = []
    for (n, k), qo, so in zip(shapes, q_offs, s_offs):
        q = packed[qo:qo + n * k].view(torch.float8_e4m3fn).view(n, k)
        s = packed.view(torch.float32)[so:so + (-(-n // 128)) * (-(-k // 128))].view(-(-n // 128), -(-k // 128))
        out.append((q, s))
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.cpu().contiguous().view(torch.uint8), b.cpu().contiguous().view(torch.uint8))


def check_group(scale_fmt: str) -> None:
    g = torch.Generator().manual_seed(0)
    big = 300 if INTERPRETED else 1000
    plain = [torch.randn(n, k, generator=g).mul(0.02).bfloat16() for n, k in
             [(big, 320), (1, 200), (130, 1), (256, 256), (129, 131)]]
    plain[3][:128, :128] = 0       # an all-zero block: scale 1.0
    plain[4][5, 7] = 3e-41         # a subnormal amax / 448 (ue8m0's subnormal branch)
    groups, hpg, hd, k = 3, 2, 80, 200
    fused = torch.randn(groups * (hpg + 2) * hd, k, generator=g).bfloat16()
    f = fused.reshape(groups, hpg + 2, hd, k)
    qkv = [f[:, :hpg].flatten(1, 2), f[:, hpg], f[:, hpg + 1]]
    views = [t.to(DEVICE) for t in plain]
    fd = fused.to(DEVICE).reshape(groups, hpg + 2, hd, k)
    views += [fd[:, :hpg].flatten(1, 2), fd[:, hpg], fd[:, hpg + 1]]
    wants = plain + [t.reshape(-1, k).contiguous() for t in qkv]
    bad = []
    even = [0, 3]       # 16-element rows and offsets: the hinted (vector) kernel; all of them: the plain one
    assert Table([views[i] for i in even], [0, 0], [0, 0]).aligned and not Table(views, [0] * 8, [0] * 8).aligned
    got = _packed(views, scale_fmt) + _packed([views[i] for i in even], scale_fmt)
    wants = wants + [wants[i] for i in even]
    for i, ((q, s), w) in enumerate(zip(got, wants)):
        rq, rs = quantize_blockfp8_reference(w, scale_fmt=scale_fmt)
        if INTERPRETED:
            from megatron_fp8pb.quant import triton_kernel
            rq = triton_kernel.quantize(w, scale_fmt=scale_fmt)[0]
        if not (_same(q, rq) and _same(s, rs)):
            bad.append((i, tuple(w.shape)))
    assert bad == [], bad


def test_group_equals_reference_amax():
    check_group("amax")


def test_group_equals_reference_ue8m0():
    check_group("ue8m0")


def test_nan_and_inf_give_nonfinite_scales_in_their_blocks():
    a = torch.randn(200, 300).bfloat16()
    b = a.clone()
    a[150, 10] = float("nan")
    b[3, 290] = float("-inf")
    (_, sa), (_, sb) = _packed([a.to(DEVICE), b.to(DEVICE)], "amax")
    want_a = torch.ones(2, 3, dtype=torch.bool)
    want_a[1, 0] = False
    want_b = torch.ones(2, 3, dtype=torch.bool)
    want_b[0, 2] = False
    assert torch.equal(torch.isfinite(sa).cpu(), want_a) and torch.equal(torch.isfinite(sb).cpu(), want_b)


if __name__ == "__main__":
    test_group_equals_reference_amax()
    test_group_equals_reference_ue8m0()
    test_nan_and_inf_give_nonfinite_scales_in_their_blocks()
    print("grouped quantizer tests passed")
