"""Single-process worker: build the megatron-core model from an HF checkpoint on the CPU (float32) and print how far
its logits are from transformers'. CPU-only stand-ins for the forward pass (not needed on a GPU): megatron-core places
the rotary frequencies on ``torch.cuda.current_device()`` and its default causal mask on "cuda", forks a CUDA RNG
stream around attention dropout, and 0.16's router GEMM reads a TransformerEngine name that is undefined without
TransformerEngine. The 2026 families' stand-ins (DSA indexer, gated DeltaNet kernels, zero-centered norms) are
``tests/forward_standins.py``'s."""
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers as tf  # noqa: E402

import forward_standins  # noqa: E402
from megatron_fp8pb.parallel import megatron as mcore  # noqa: E402
from megatron_fp8pb.parallel import session  # noqa: E402
from megatron_fp8pb.archs import dims_from_hf  # noqa: E402
from megatron_fp8pb.config import ParallelConfig  # noqa: E402
from megatron_fp8pb.sources.hf import HFReader, hf_config  # noqa: E402
from megatron_fp8pb.sources.registry import load_hf_weights  # noqa: E402


def main(src: str, tp: str = "1") -> None:
    with session.started(ParallelConfig(tp=int(tp), backend="gloo", device="cpu", timeout_s=60)) as job:
        compare_logits(src, job.layout)


def compare_logits(src: str, layout) -> None:
    d = dims_from_hf(hf_config(src))
    forward_standins.before_build(d.model_type)
    model = mcore.build_gpt(d, torch.float32, layout).eval()
    load_hf_weights(model, HFReader(src), d, layout)
    forward_standins.after_build(d.model_type, model)
    torch.cuda.current_device = lambda: "cpu"
    import megatron.core.transformer.moe.moe_utils as moe_utils
    moe_utils.te_general_gemm = getattr(moe_utils, "te_general_gemm", None)
    import megatron.core.fusions.fused_softmax as fused_softmax   # its causal mask is made on "cuda"
    fused_softmax.get_default_causal_mask = lambda sq: torch.ones(sq, sq, dtype=torch.bool).triu(1)
    from megatron.core import tensor_parallel    # attention dropout (0 here) forks a CUDA RNG stream
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    vocab = d.vocab
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        ours = model(input_ids=ids, position_ids=pos, attention_mask=None)
        if layout.tp_size > 1:    # the output layer's vocabulary shards, gathered
            from megatron.core import parallel_state
            parts = [torch.empty_like(ours) for _ in range(layout.tp_size)]
            torch.distributed.all_gather(parts, ours.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            ours = torch.cat(parts, dim=-1)
        ours = ours[..., :vocab].float()
        ref = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(input_ids=ids).logits.float()
    rel = float((ours - ref).norm() / ref.norm())
    top1 = float((ours.argmax(-1) == ref.argmax(-1)).float().mean())
    if torch.distributed.get_rank() == 0:
        print(f"FORWARD rel_err={rel:.3e} top1={top1:.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
