"""DeepSeek-V3 (multi-latent attention, dense first layer, shared experts, float32 expert bias) and GLM-4-MoE through
the real CLI (torchrun + gloo + megatron-core GPTModel): byte for byte against the single-process reference for
layouts whose per-rank sizes are not multiples of 128, every HF tensor written exactly once, and transformers loading
the result. The module's exports run in one torchrun launch (tests/jobs.py), each on a process group of its own world
size."""
import json
import re

import pytest
import torch
import transformers as tf

from helpers import claim_mtp_layers, mismatches, ragged_deepseek_v3, ragged_glm4_moe, read_output
from jobs import Job
from megatron_fp8pb.archs import dims_from_hf, rules_for
from megatron_fp8pb.plan.params import expected_tensors, linear_weights
from megatron_fp8pb.sources.tiny import tiny_hf_config
from megatron_fp8pb.verify import verify_checkpoint


def _check_written_once(out, cfg, state):
    """The index names each expected HF tensor once (plus a scale for each quantized linear), nothing else; the
    float32 expert bias keeps its dtype and bytes."""
    d = dims_from_hf(cfg)
    expected = expected_tensors(rules_for(d), d)
    assert set(expected) == set(state)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    skip = set(json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"])
    linear = linear_weights(rules_for(d), d)
    scales = {n[:-len(".weight")] + ".weight_scale_inv" for n in linear if n[:-len(".weight")] not in skip}
    assert set(index) == set(expected) | scales
    got = read_output(out)
    for i in d.moe_layers:
        bias = f"model.layers.{i}.mlp.gate.e_score_correction_bias"
        assert got[bias].dtype == torch.float32 and torch.equal(got[bias], state[bias])
        assert f"model.layers.{i}.mlp.gate" in skip
    for i in d.dense_layers:
        assert f"model.layers.{i}.mlp.down_proj.weight_scale_inv" in index
        assert not any(n.startswith(f"model.layers.{i}.mlp.experts.") for n in index)


LAYOUTS = [(2, 2, 1, 1, 2), (1, 2, 2, 1, 4), (1, 1, 1, 2, 2), (2, 1, 1, 2, 4)]   # (tp, ep, etp, pp, world)
IDS = [f"tp{a}ep{b}etp{c}pp{d}" for a, b, c, d, _ in LAYOUTS]
CONFIGS = {"deepseek_v3": ragged_deepseek_v3, "glm4_moe": ragged_glm4_moe}


def _ragged_linears(cfg) -> list[str]:
    """The linears whose dims are not multiples of 128 (excluded from quantization in test_transformers_loads)."""
    d = dims_from_hf(cfg)
    return sorted({n[:-len(".weight")] for n, s in linear_weights(rules_for(d), d).items() if s[0] % 128 or s[1] % 128})


def _load_job(arch: str, args: list[str]) -> Job:
    ragged = _ragged_linears(tiny_hf_config(arch))
    return Job(2, [*args] + ([f"quant.exclude=[{','.join(ragged)}]"] if ragged else []), tiny_hf_config(arch))


# transformers 5.24 dequantizes on CPU with block = rows // scale_rows: a quantized tensor whose dims are not
# multiples of 128 comes out wrong (kv_a_proj_with_mqa 192 rows -> block 96), so those stay unquantized here.
# The tiny configs (hidden 384) keep most dims multiples of 128; DeepSeek's kv_b_proj (kv_lora_rank 192 inputs)
# does not, and is excluded.
LOAD_CASES = [("deepseek_v3", ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1"]),
              ("glm4_moe", ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1"])]
MTP_LAYOUTS = [(2, 1, 2), (1, 2, 1)]    # (tp, pp, ep)

KIMI_FILES = {"configuration_deepseek.py": "# the checkpoint's own config class\n",
              "tokenization_kimi.py": "# the checkpoint's own tokenizer\n", "tiktoken.model": "tiktoken ranks\n"}
KIMI_AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}


def _as_kimi_k2(src):
    """Kimi-K2's checkpoint: DeepSeek-V3's layout under model_type kimi_k2, which transformers does not know (its
    config.json's auto_map names the checkpoint's own code), with a tiktoken tokenizer."""
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="kimi_k2", auto_map=KIMI_AUTO_MAP)
    (src / "config.json").write_text(json.dumps(cfg))
    for name, text in KIMI_FILES.items():
        (src / name).write_text(text)
    (src / "tokenizer_config.json").write_text(json.dumps({"auto_map": {
        "AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}}))


JOBS = {
    **{f"test_byte_identical[{arch}-{i}]": Job(world, [f"parallel.tp={tp}", f"parallel.ep={ep}", f"parallel.etp={etp}",
                                                      f"parallel.pp={pp}", "output.max_shard_size=1MB"], make())
       for arch, make in CONFIGS.items() for i, (tp, ep, etp, pp, world) in zip(IDS, LAYOUTS)},
    "test_deepseek_v3_q_proj_without_q_lora": Job(2, ["parallel.tp=2"], ragged_deepseek_v3(q_lora_rank=None)),
    "test_mtp_layers_the_source_lacks_are_left_out": Job(2, ["parallel.tp=2"], ragged_deepseek_v3(mtp=0),
                                                        edit=claim_mtp_layers),
    "test_kimi_k2_with_its_own_code_and_tokenizer": Job(2, ["parallel.tp=2"], ragged_deepseek_v3(mtp=0),
                                                       edit=_as_kimi_k2),
    **{f"test_transformers_loads[{arch}]": _load_job(arch, args) for arch, args in LOAD_CASES},
    **{f"test_multi_token_prediction[{i}-{arch}]": Job(tp * pp, [f"parallel.tp={tp}", f"parallel.pp={pp}",
                                                                f"parallel.ep={ep}", "parallel.etp=1"], make(mtp=1))
       for arch, make in CONFIGS.items() for i, (tp, pp, ep) in zip(["tp2ep2", "pp2"], MTP_LAYOUTS)},
}


@pytest.mark.parametrize("tp,ep,etp,pp,world", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("make_cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_byte_identical(exported, make_cfg, tp, ep, etp, pp, world):
    assert exported.returncode == 0, exported.log()
    assert mismatches(exported.out, exported.state) == []
    _check_written_once(exported.out, make_cfg(), exported.state)


def test_deepseek_v3_q_proj_without_q_lora(exported):
    """q_lora_rank null: Megatron's linear_q_proj becomes self_attn.q_proj."""
    assert exported.returncode == 0, exported.log()
    out = exported.out
    assert mismatches(out, exported.state) == []
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.self_attn.q_proj.weight_scale_inv" in index and not any("q_a_proj" in n for n in index)


def test_kimi_k2_with_its_own_code_and_tokenizer(exported):
    """Exported byte for byte as DeepSeek-V3; config.json keeps model_type and auto_map, the code and tokenizer
    files it names come along, and verify says the transformers load was skipped rather than failed."""
    assert exported.returncode == 0, exported.log()
    out = exported.out
    assert mismatches(out, exported.state) == []
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "kimi_k2" and cfg["auto_map"] == KIMI_AUTO_MAP and "quantization_config" in cfg
    assert {n: (out / n).read_text() for n in KIMI_FILES} == KIMI_FILES
    assert "transformers load    -  (skipped: transformers has no built-in model_type 'kimi_k2'" in exported.stdout
    assert re.search(r"^verify \S+: OK$", exported.stdout, re.M), exported.log()


def test_mtp_layers_the_source_lacks_are_left_out(exported):
    """A config naming an MTP layer (transformers' default) over weights without one (what transformers saves): the
    export warns, writes the decoder layers byte for byte, and its config.json says num_nextn_predict_layers 0."""
    assert exported.returncode == 0, exported.log()
    assert "holds none: exported without them" in exported.stderr
    assert mismatches(exported.out, exported.state) == []
    _check_written_once(exported.out, ragged_deepseek_v3(mtp=0), exported.state)
    assert json.loads((exported.out / "config.json").read_text())["num_nextn_predict_layers"] == 0


@pytest.mark.parametrize("arch,args", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_transformers_loads(exported, arch, args):
    assert exported.returncode == 0, exported.log()
    ragged = _ragged_linears(tiny_hf_config(arch))
    src, out, state = exported.src, exported.out, exported.state
    assert mismatches(out, state) == []
    got = read_output(out)
    assert sum(t.dtype == torch.float8_e4m3fn for t in got.values()) > 0
    model, info = tf.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, device_map="cpu",
                                                          output_loading_info=True)
    assert not any(info.values()), info
    report = verify_checkpoint(out, source=src, logits=True)
    print(f"{arch}: excluded {ragged}; logits vs source {report.logits}")
    assert report.ok, report.table()
    assert report.logits["rel_err"] < 0.1 and report.logits["top1"] >= 0.9, report.logits


@pytest.mark.parametrize("make_cfg", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("tp,pp,ep", MTP_LAYOUTS, ids=["tp2ep2", "pp2"])
def test_multi_token_prediction(exported, make_cfg, tp, pp, ep):
    """One MTP layer (Megatron ``mtp.layers.0``, built on the last stage) -> HF layer 2 as DeepSeek-V3's and
    GLM-4.5's checkpoints hold it: a full MoE decoder layer plus enorm, hnorm, eh_proj, shared_head.norm and
    shared_head.head (the output layer again, unquantized like lm_head)."""
    assert exported.returncode == 0, exported.log()
    cfg, out, state = make_cfg(mtp=1), exported.out, exported.state
    assert mismatches(out, state) == []
    _check_written_once(out, cfg, state)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    attn = "kv_b_proj" if cfg.model_type == "deepseek_v3" else "q_proj"
    for leaf in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", f"self_attn.{attn}.weight_scale_inv", "mlp.experts.3.down_proj.weight",
                 "mlp.gate.e_score_correction_bias", "mlp.shared_experts.up_proj.weight_scale_inv"):
        assert f"model.layers.2.{leaf}" in index, leaf
    assert "model.layers.2.shared_head.head" in json.loads((out / "config.json").read_text())[
        "quantization_config"]["modules_to_not_convert"]
