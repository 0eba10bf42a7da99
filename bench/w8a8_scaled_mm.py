"""The W8A8 simulation of verify --logits (pure torch) against torch's blockwise scaled_mm on a GPU.

x [M, K] bf16 activations, w [N, K] bf16 weights. Simulation: quantize_activation(x) (1 x 128 groups per token)
@ dequantize(quantize_blockfp8(w)).T in float32. GPU: torch._scaled_mm with the fp8 bytes, BlockWise1x128 scales
for x and the exported 128x128 weight_scale_inv for w. Prints the relative difference of the two, and of each
against the bf16 product.
"""
import sys

import torch

sys.path.insert(0, ".")
from megatron_fp8pb.quant.reference import dequantize_blockfp8, quantize_blockfp8_reference  # noqa: E402
from megatron_fp8pb.verify.serving import quantize_activation  # noqa: E402


def act_q(x: torch.Tensor):
    """x [M, K] -> fp8 [M, K], scale [M, K/128] (amax/448 per token per 128)."""
    m, k = x.shape
    g = x.float().reshape(m, k // 128, 128)
    amax = g.abs().amax(-1)
    s = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (g / s[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(m, k)
    return q, s


def main():
    dev = "cuda"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    rows = []
    for (m, k, n) in ((256, 1024, 768), (512, 4096, 1536), (128, 7168, 2048)):
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4).to(torch.bfloat16)
        w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
        wq, ws = quantize_blockfp8_reference(w)
        ref = x.float() @ w.float().T
        sim = quantize_activation(x.float()) @ dequantize_blockfp8(wq, ws, dtype=torch.float32).T
        xq, xs = act_q(x)
        sa = xs.to(dev).t().contiguous().t()                 # outer-dim-major [M, K/128]
        out, how = None, ""
        for name, sb in (("scale_b = ws.t()", ws.to(dev).t()), ("ws.t().contiguous()", ws.to(dev).t().contiguous()),
                         ("ws", ws.to(dev))):
            try:
                out = torch._scaled_mm(xq.to(dev), wq.to(dev).t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
                torch.cuda.synchronize()
                how = name
                break
            except Exception as e:  # report and try the next layout
                print(f"  {m}x{k}x{n} {name}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        if out is None:
            rows.append((m, k, n, "-", "-", "-", "no blockwise scaled_mm"))
            continue
        gpu = out.cpu()
        rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
        rows.append((m, k, n, f"{rel(gpu, sim):.2e}", f"{rel(sim, ref):.3e}", f"{rel(gpu, ref):.3e}",
                     how))
    print(f"{'M':>5} {'K':>5} {'N':>5}  {'gpu vs sim':>10}  {'sim vs bf16':>11}  {'gpu vs bf16':>11}  note")
    for r in rows:
        print(f"{r[0]:>5} {r[1]:>5} {r[2]:>5}  {r[3]:>10}  {r[4]:>11}  {r[5]:>11}  {r[6]}")


if __name__ == "__main__":
    main()
