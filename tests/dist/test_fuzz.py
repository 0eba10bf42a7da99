"""Seeded fuzzing: random small architectures and parallel layouts against the single-process reference.

CI runs FP8PB_FUZZ_CASES (default 2) cases; run more on demand, e.g. FP8PB_FUZZ_CASES=30 FP8PB_FUZZ_SEED=7.
"""
import os
import random

import pytest
import transformers as tf

from helpers import mismatches, torchrun, write_hf_source

CASES = int(os.environ.get("FP8PB_FUZZ_CASES", "2"))
SEED = int(os.environ.get("FP8PB_FUZZ_SEED", "2026"))


def random_case(rng: random.Random):
    arch = rng.choice(["llama", "mistral", "qwen2", "qwen3"])
    kv = rng.choice([1, 2, 4])
    heads = kv * rng.choice([1, 2, 3])
    head_dim = rng.choice([32, 64, 80, 96])
    layers = rng.choice([1, 2, 3, 4])
    tp = rng.choice([t for t in (1, 2, 4) if kv % t == 0 and heads % t == 0])
    pp = rng.choice([p for p in (1, 2, 4) if layers % p == 0 and tp * p <= 4])
    ffn = 16 * tp * rng.randint(4, 60)
    hidden = rng.choice([h for h in (128, 192, 320, 448, 576) if h % heads == 0] or [heads * 32])
    kw = dict(vocab_size=rng.randint(300, 2100), hidden_size=hidden, intermediate_size=ffn,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
              tie_word_embeddings=rng.random() < 0.5, max_position_embeddings=256)
    if arch == "qwen2":     # head_dim = hidden / heads
        cfg = tf.Qwen2Config(**kw)
    else:
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen3": tf.Qwen3Config}[arch]
        cfg = cls(head_dim=head_dim, **kw)
    return cfg, tp, pp


@pytest.mark.parametrize("case", range(CASES))
def test_fuzz_layouts(tmp_path, case):
    rng = random.Random(SEED * 1000 + case)
    cfg, tp, pp = random_case(rng)
    src = tmp_path / "src"
    state = write_hf_source(src, cfg, seed=case)
    out = tmp_path / "out"
    args = ["source.kind=hf", f"source.path={src}", f"parallel.tp={tp}", f"parallel.pp={pp}", f"output.dir={out}",
            "output.max_shard_size=300KB", "output.verify=false"]
    if rng.random() < 0.3:
        args.append("quant.lm_head=true")
        if cfg.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
    r = torchrun(tp * pp, args)
    desc = f"case {case}: {cfg.model_type} {cfg.to_diff_dict()} tp={tp} pp={pp} {args[-1]}"
    assert r.returncode == 0, desc + "\n" + r.stderr[-3000:]
    assert mismatches(out, state) == [], desc
