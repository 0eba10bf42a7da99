"""The Megatron model built from an HF checkpoint computes the HF model's logits (proves the name/fusion mapping,
not only a round trip). Megatron's forward needs CUDA: skipped without a GPU.

The 2026 families run with ``tests/forward_standins.py``'s stand-ins for the GPU: the DSA indexer without its
Hadamard rotation (fast_hadamard_transform is not installed; transformers leaves it out too) and the zero-centered
norms of Qwen3-Next / Qwen3.5; gated DeltaNet runs flash-linear-attention's own kernels. DSA at ``index_topk`` >= the
32 tokens is dense attention; ``index_topk`` 8 makes the logits depend on the indexer's weights (see
tests/dist/test_mcore_forward_cpu.py)."""
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="module", autouse=True)
def megatron_world():
    from megatron_fp8pb.parallel import session
    from megatron_fp8pb.config import ParallelConfig
    os.environ.setdefault("MASTER_PORT", "29517")
    with session.started(ParallelConfig(backend="nccl", device="cuda", timeout_s=120)):
        yield


@pytest.mark.parametrize("arch,tie,override", [
    ("qwen3", False, {}), ("llama", True, {}), ("qwen2", False, {}), ("mistral", False, {}), ("qwen3_moe", False, {}),
    ("deepseek_v3", False, {"q_lora_rank": 192}), ("deepseek_v3", False, {}), ("glm4_moe", False, {}),
    ("deepseek_v32", False, {"index_topk": 32}), ("deepseek_v32", False, {"index_topk": 8}),
    ("glm_moe_dsa", False, {"index_topk": 32}), ("glm_moe_dsa", False, {"index_topk": 8, "indexer_types": ["full"] * 4}),
    ("qwen3_next", False, {}), ("qwen3_5_moe_text", False, {})],
    ids=["qwen3", "llama-tied", "qwen2", "mistral", "qwen3_moe", "deepseek_v3-q_lora", "deepseek_v3-q_proj",
         "glm4_moe", "deepseek_v32-dense_topk", "deepseek_v32-sparse_topk", "glm_moe_dsa-dense_topk",
         "glm_moe_dsa-sparse_topk", "qwen3_next", "qwen3_5_moe_text"])
def test_megatron_logits_equal_hf(tmp_path, monkeypatch, arch, tie, override):
    from transformers import AutoModelForCausalLM

    from helpers import write_hf_source
    from megatron_fp8pb.parallel import megatron as mcore
    from megatron_fp8pb.config import load_config
    from megatron_fp8pb.sources.registry import build_source
    from megatron_fp8pb.sources.tiny import tiny_hf_config
    import megatron.core
    if arch == "deepseek_v3" and not override and tuple(map(int, megatron.core.__version__.split(".")[:2])) >= (0, 19):
        pytest.skip("megatron-core >= 0.19 builds MLA without a q latent only with TransformerEngine's fused "
                    "norm+linear (its local spec refuses); tests/dist/test_mcore_forward_cpu.py covers it on 0.16")
    import forward_standins
    if arch in forward_standins.GDN:
        from megatron_fp8pb.parallel.gdn_local import fla_missing
        if fla_missing():
            pytest.skip(f"megatron-core builds GatedDeltaNet only with flash-linear-attention: {fla_missing()}")
    forward_standins.before_build(arch, monkeypatch.setattr, on_gpu=True)
    src = tmp_path / "src"
    cfg = tiny_hf_config(arch, tie_embeddings=tie)
    for key, value in override.items():
        setattr(cfg, key, value)
    write_hf_source(src, cfg)
    layout, _ = mcore.layout_and_groups()
    source = build_source(load_config(None, ["source.kind=hf", f"source.path={src}"]), layout, on_gpu=True)
    model = source.model.eval()
    forward_standins.after_build(arch, model)
    ids = torch.randint(0, 1003, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    pos = torch.arange(32, device="cuda").unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        ours = model(input_ids=ids, position_ids=pos, attention_mask=None)[..., :1003].float()
        hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16).cuda().eval()
        ref = hf(input_ids=ids).logits.float()
    rel = float((ours - ref).norm() / ref.norm())
    top1 = float((ours.argmax(-1) == ref.argmax(-1)).float().mean())
    print(f"{arch} {override}: megatron vs HF logits rel err {rel:.4f}, top-1 agreement {top1:.3f}")
    assert rel < 0.03 and top1 >= 0.95
