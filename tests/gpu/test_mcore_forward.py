"""The Megatron model built from an HF checkpoint computes the HF model's logits (proves the name/fusion mapping,
not only a round trip). Megatron's forward needs CUDA: skipped without a GPU."""
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
    from megatron_fp8pb import mcore
    os.environ.setdefault("MASTER_PORT", "29517")
    mcore.init_distributed("nccl", 120)
    mcore.initialize_parallel(1, 1)
    yield
    mcore.destroy_parallel()


@pytest.mark.parametrize("arch,tie", [("qwen3", False), ("llama", True), ("qwen2", False), ("mistral", False),
                                      ("qwen3_moe", False), ("deepseek_v3", False), ("glm4_moe", False)])
def test_megatron_logits_equal_hf(tmp_path, arch, tie):
    from transformers import AutoModelForCausalLM

    from helpers import write_hf_source
    from megatron_fp8pb import mcore
    from megatron_fp8pb.config import load_config
    from megatron_fp8pb.sources import build_source
    from megatron_fp8pb.tiny import tiny_hf_config
    src = tmp_path / "src"
    write_hf_source(src, tiny_hf_config(arch, tie_embeddings=tie))
    layout, _ = mcore.layout_and_groups()
    source = build_source(load_config(None, ["source.kind=hf", f"source.path={src}"]), layout, on_gpu=True)
    model = source.model.eval()
    ids = torch.randint(0, 1003, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    pos = torch.arange(32, device="cuda").unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        ours = model(input_ids=ids, position_ids=pos, attention_mask=None)[..., :1003].float()
        hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16).cuda().eval()
        ref = hf(input_ids=ids).logits.float()
    rel = float((ours - ref).norm() / ref.norm())
    top1 = float((ours.argmax(-1) == ref.argmax(-1)).float().mean())
    print(f"{arch}: megatron vs HF logits rel err {rel:.4f}, top-1 agreement {top1:.3f}")
    assert rel < 0.03 and top1 >= 0.95
