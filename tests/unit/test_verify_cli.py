"""verify as a user meets it: single-file checkpoints, the transformers load on the meta device, the transformers
dequantize note, grouped errors ending with the fix, and the command line's exit codes."""
from __future__ import annotations

import shutil
import subprocess
import sys

import torch
from safetensors.torch import save_file

from megatron_fp8pb.output.hf_files import config_json, quantization_config
from megatron_fp8pb.verify.serve_check import layers_for_transformers, transformers_problems
from megatron_fp8pb.sources.tiny import random_hf_state, tiny_hf_config
from megatron_fp8pb.verify import main, verify_checkpoint
from megatron_fp8pb.verify.logits import quantize_activation

from fp8_checkpoints import Q, output_tensors, rewrite, write_output


def test_single_file_checkpoint_is_accepted(tiny, tmp_path):
    src, _, state = tiny
    cfg = tiny_hf_config("qwen3")
    out = tmp_path / "single"
    out.mkdir()
    save_file(output_tensors(state), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_bytes(config_json(cfg, cfg.vocab_size, False, torch.bfloat16,
                                                  quantization_config(["lm_head"], True)))
    rep = verify_checkpoint(out, source=src)
    assert rep.ok, rep.table()
    assert rep.counts()["exact"] == rep.counts()["checked"] == 25
    assert rep.transformers_load["missing"] == rep.transformers_load["unexpected"] == []
    r = subprocess.run([sys.executable, "-m", "megatron_fp8pb.verify", str(out), "--source", str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    shutil.copy(out / "model.safetensors", out / "model-00001-of-00002.safetensors")
    assert not verify_checkpoint(out).ok               # a second file nobody reads without an index


def test_transformers_load_finds_a_renamed_tensor(bad):
    def rename(t):
        t["model.layers.0.mlp.gate_proj.weight_renamed"] = t.pop("model.layers.0.mlp.gate_proj.weight")
    rewrite(bad, Q, rename)
    rep = verify_checkpoint(bad)
    assert not rep.ok
    assert "model.layers.0.mlp.gate_proj.weight" in rep.transformers_load["missing"]
    assert [e for e in rep.errors if e.startswith("transformers (Qwen3ForCausalLM, meta device) finds")]
    assert "transformers load    FAILED" in rep.table()


def test_a_missing_directory_is_not_called_loaded(tmp_path):
    rep = verify_checkpoint(tmp_path / "nowhere")
    assert not rep.ok and "transformers load    -" in rep.table() and "load    OK" not in rep.table()


def test_transformers_dequantize_note_names_wrong_and_refused_weights():
    mods = {"model.layers.0.self_attn.q_proj": (192, 384), "model.layers.0.self_attn.k_proj": (128, 384),
            "model.layers.0.self_attn.kv_a_proj_with_mqa": (576, 7168), "model.layers.0.mlp.up_proj": (1024, 384)}
    probs = {p.module: p.message for p in transformers_problems(mods)}
    assert set(probs) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.kv_a_proj_with_mqa"}
    assert "192//2 x 384//3 = 96 x 128: silently wrong values" in probs["model.layers.0.self_attn.q_proj"]
    assert "refuses it (576 x 7168 is not divisible by the scale grid 5 x 56)" in \
        probs["model.layers.0.self_attn.kv_a_proj_with_mqa"]
    # the target keeps the fused siblings of q_proj (k_proj) with it, for servers that fuse q/k/v
    assert layers_for_transformers(mods) == ["model.layers.0.self_attn.k_proj",
                                             "model.layers.0.self_attn.kv_a_proj_with_mqa",
                                             "model.layers.0.self_attn.q_proj"]


def test_errors_are_grouped_across_layers_and_end_with_the_fix(tiny, capsys):
    out = tiny[1]
    rep = verify_checkpoint(out, serve_tp=(2,), load=False)
    table = rep.table()
    lines = [line for line in table.splitlines() if line.startswith("  error:")]
    assert len(rep.errors) == 2 * len(lines)               # two layers, one line each
    assert all(line.startswith("  error: (2x) serve-check: model.layers.*.") for line in lines)
    assert table.splitlines()[-1] == "  fix: re-export with quant.serve_tp=2"
    assert "JSON" not in table
    short = rep.table(max_lines=1)
    assert "more error(s) (megatron-fp8pb-verify --json REPORT.json lists all of them)" in short
    assert main([str(out), "--serve-tp", "2", "--no-load"]) == 1
    assert "fix: re-export with quant.serve_tp=2" in capsys.readouterr().out


def test_transformers_as_a_required_target(tmp_path):
    cfg = tiny_hf_config("qwen3")
    cfg.head_dim = 48                                       # q_proj 288 rows, k/v 96: not multiples of 128
    state = random_hf_state(cfg)
    out = write_output(cfg, state, tmp_path / "o")
    rep = verify_checkpoint(out, load=False)
    assert rep.ok and rep.transformers and [w for w in rep.warnings if w.startswith("transformers-check")]
    rep = verify_checkpoint(out, serve_transformers=True, load=False)
    assert not rep.ok and rep.table().splitlines()[-1] == "  fix: re-export with quant.serve_tp=transformers"
    assert main([str(out), "--serve-tp", "transformers", "--no-load"]) == 1


def test_activation_quantization_is_per_token_per_128():
    x = torch.randn(3, 5, 300, dtype=torch.float32)
    x[0, 0, 128:256] *= 1000                                # one loud group must not coarsen its neighbours
    y = quantize_activation(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    for t in range(3):
        for g in range(0, 300, 128):
            xs, ys = x[t, :, g:g + 128], y[t, :, g:g + 128]
            scale = xs.abs().amax(-1, keepdim=True) / 448
            assert torch.equal(ys, (xs / scale).to(torch.float8_e4m3fn).float() * scale)
    assert torch.equal(quantize_activation(torch.zeros(2, 256)), torch.zeros(2, 256))


def test_an_error_of_one_layer_names_its_tensor_and_errors_of_several_layers_are_grouped(bad):
    rewrite(bad, Q, lambda t: t.pop(Q + "_scale_inv"))
    lines = [line for line in verify_checkpoint(bad, load=False).table().splitlines() if line.startswith("  error:")]
    assert lines == [f"  error: tensor {Q!r} is F8_E4M3 but has no {Q + '_scale_inv'!r}; write its float32 block "
                     f"scales [9, 3] = [ceil(N/128), ceil(K/128)] next to it"]
    q1 = Q.replace("layers.0.", "layers.1.")
    rewrite(bad, q1, lambda t: t.pop(q1 + "_scale_inv"))
    lines = [line for line in verify_checkpoint(bad, load=False).table().splitlines() if line.startswith("  error:")]
    assert lines == ["  error: (2x) tensor 'model.layers.*.mlp.gate_proj.weight' is F8_E4M3 but has no "
                     "'model.layers.*.mlp.gate_proj.weight_scale_inv'; write its float32 block scales [9, 3] = "
                     "[ceil(N/128), ceil(K/128)] next to it [layers 0-1]"]
