"""Qwen3.5-MoE's vision-language checkpoint through the real CLI (torchrun + gloo): a source saved by transformers'
own ``Qwen3_5MoeForConditionalGeneration`` (seeded random weights, bf16 with a float32 ``A_log`` as the release
stores it, and a float32 projector to show the vision tower is carried as stored; no dim a multiple of 128). The
language model byte for byte against the single-process reference, the vision tower and projector byte-identical
to the source and named in modules_to_not_convert, the config still a vision-language one, and transformers
loading the output with its logits following the source's."""
import json

import pytest
import torch
import transformers as tf

from helpers import mismatches, read_output
from jobs import Job
from megatron_fp8pb.archs import arch, dims_from_hf, rules_for
from megatron_fp8pb.plan.params import linear_weights

ARCH = "qwen3_5_moe"
VISUAL = "model.visual."


def _tiny(**kw):
    return arch(ARCH).tiny[ARCH](False, **kw)


def _loadable():
    """Language-model dims transformers' CPU dequantize reads right (multiples of 128); the vision tower stays ragged
    (it is not quantized)."""
    return _tiny(hidden_size=256, head_dim=128, linear_key_head_dim=128, linear_value_head_dim=128,
                 moe_intermediate_size=128, shared_expert_intermediate_size=128)


def _ragged(cfg) -> list[str]:
    d = dims_from_hf(cfg)
    return sorted({n[:-len(".weight")] for n, s in linear_weights(rules_for(d), d).items()
                   if (s[0] % 128 or s[1] % 128) and not n.startswith(VISUAL)})


def _transformers_source(cfg, seed: int):
    """``edit``: replace the seeded source's weights with transformers' own save_pretrained of a random model."""
    def edit(src):
        torch.manual_seed(seed)
        model = tf.Qwen3_5MoeForConditionalGeneration(cfg).to(torch.bfloat16)
        for name, p in model.named_parameters():
            if name.endswith("A_log") or name.startswith(VISUAL + "merger."):   # kept as stored, whatever dtype
                p.data = p.data.float()
        for f in list(src.glob("model*.safetensors*")):
            f.unlink()
        model.save_pretrained(str(src), max_shard_size="1MB")
    return edit


def _job(world, args, cfg, seed=0):
    return Job(world, args, cfg, seed=seed, edit=_transformers_source(cfg, seed))


SHARDS = "output.max_shard_size=1MB"
JOBS = {
    "test_byte_identical[tp2ep2]": _job(2, ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1", SHARDS], _tiny()),
    "test_byte_identical[tp2pp2]": _job(4, ["parallel.tp=2", "parallel.pp=2", "parallel.etp=1", SHARDS], _tiny()),
    "test_transformers_loads": _job(2, ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1",
                                        f"quant.exclude=[{','.join(_ragged(_loadable()))}]"], _loadable(), seed=1),
}


def _source(exported) -> dict[str, torch.Tensor]:
    return read_output(exported.src)


def _vision_linears(cfg) -> set[str]:
    with torch.device("meta"):
        tower = tf.Qwen3_5MoeForConditionalGeneration(cfg)
    return {n for n, m in tower.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(VISUAL)}


@pytest.mark.parametrize("layout", ["tp2ep2", "tp2pp2"])
def test_byte_identical(exported, layout):
    assert exported.returncode == 0, exported.log()
    src, out = _source(exported), read_output(exported.out)
    assert mismatches(exported.out, src) == []
    kept = {n: t for n, t in out.items() if t.dtype != torch.float8_e4m3fn and not n.endswith("_scale_inv")}
    for name, t in kept.items():
        assert t.dtype == src[name].dtype and torch.equal(t.view(torch.uint8), src[name].view(torch.uint8)), name
    visual = {n for n in src if n.startswith(VISUAL)}
    assert visual and visual <= set(kept), sorted(visual - set(kept))[:4]
    assert not any(n.startswith(VISUAL) for n in out if n.endswith("_scale_inv"))
    assert all(out[n].dtype == torch.float32 for n in out if n.endswith("linear_attn.A_log") or ".merger." in n)
    assert sum(t.dtype == torch.float8_e4m3fn for t in out.values()) >= 10
    assert set(n for n in out if not n.endswith("_scale_inv")) == set(src)
    cfg = json.loads((exported.out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3_5MoeForConditionalGeneration"] and cfg["model_type"] == ARCH
    assert cfg["text_config"]["vocab_size"] == 1003 and "vocab_size" not in cfg
    assert "vision_config" in cfg and "quantization_config" not in cfg["text_config"]
    skip = set(cfg["quantization_config"]["modules_to_not_convert"])
    linears = _vision_linears(_tiny())
    assert linears and linears <= skip, sorted(linears - skip)[:4]
    lm = {n for n in skip if not n.startswith(VISUAL)}
    assert "lm_head" in lm and any(n.endswith("linear_attn.in_proj_a") for n in lm)


def test_transformers_loads(exported):
    """transformers builds the vision-language class from the output with every tensor used and none missing, its
    vision tower's weights the source's, and text logits following the source model's."""
    assert exported.returncode == 0, exported.log()
    kw = dict(dtype=torch.float32, device_map="cpu")
    model, info = tf.Qwen3_5MoeForConditionalGeneration.from_pretrained(str(exported.out), output_loading_info=True,
                                                                        **kw)
    assert not any(info.values()), info
    ref = tf.Qwen3_5MoeForConditionalGeneration.from_pretrained(str(exported.src), **kw)
    for name, p in ref.named_parameters():
        if name.startswith(VISUAL):
            assert torch.equal(model.state_dict()[name], p), name
    ids = torch.randint(0, 1003, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    rel = float((got - want).norm() / want.norm())
    top1 = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    print(f"{ARCH}: logits rel err {rel:.4f}, top-1 agreement {top1:.3f}")
    assert rel < 0.1 and top1 > 0.8, (rel, top1)
