"""verify_checkpoint on a tiny qwen3 export written here, and on one corruption at a time."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from megatron_fp8pb.quant.reference import quantize_blockfp8
from megatron_fp8pb.output.hf_files import config_json
from megatron_fp8pb.sources.hf import DictReader
from megatron_fp8pb.sources.tiny import random_hf_state, tiny_hf_config
from megatron_fp8pb.verify import BOUND_SLACK, INDEX, main, should_convert_module, verify_checkpoint
from megatron_fp8pb.output.writer import CheckpointWriter, TensorSpec

from fp8_checkpoints import Q, file_of, patch, read_index, rewrite, write_output


def _errors_naming(rep, name: str) -> list[str]:
    return [e for e in rep.errors if name in e]


def test_good_checkpoint_passes_byte_exact(tiny):
    src, out, _ = tiny
    rep = verify_checkpoint(out, source=src)
    assert rep.ok, rep.table()
    c = rep.counts()
    assert c["failed"] == 0 and c["within_bound"] == 0
    assert c["exact"] == c["checked"] == 25
    assert c["quantized"] == 14
    assert set(rep.serve) == {1, 2, 4, 8}
    assert rep.transformers == []
    assert "OK" in rep.table()


def test_good_checkpoint_passes_against_reader_and_cli(tiny, tmp_path, capsys):
    src, out, state = tiny
    assert verify_checkpoint(out, source=DictReader(state)).ok
    report = tmp_path / "r.json"
    assert main([str(out), "--source", str(src), "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["ok"] and data["counts"]["exact"] == 25
    assert "tensors checked" in capsys.readouterr().out


def test_flipped_fp8_byte_is_caught_against_source(tiny, bad):
    src, _, state = tiny
    q, _ = quantize_blockfp8(state[Q])
    at = int(q.float().abs().argmax())
    byte = q.view(torch.uint8).reshape(-1)[at].item()
    patch(bad, Q, at, bytes([byte ^ 0xFF]))
    rep = verify_checkpoint(bad, source=src)
    assert not rep.ok
    assert _errors_naming(rep, Q) and rep.tensors[Q].status == "FAIL"
    assert rep.tensors[Q].bytes_differing == 1 and rep.tensors[Q].max_err_ratio > 1
    assert all(r.status == "exact" for n, r in rep.tensors.items() if n != Q)


def test_nan_fp8_byte_is_caught_by_scan_without_source(bad):
    patch(bad, Q, 5, bytes([0x7F]))
    assert verify_checkpoint(bad).ok
    rep = verify_checkpoint(bad, scan_weights=True)
    assert [e for e in rep.errors if Q in e and "NaN" in e]


def test_wrong_scale_value_is_caught_against_source(tiny, bad):
    src = tiny[0]
    patch(bad, Q + "_scale_inv", 4 * 4, struct.pack("<f", 1.0))
    rep = verify_checkpoint(bad, source=src)
    assert _errors_naming(rep, Q) and rep.tensors[Q].status == "FAIL"
    assert rep.tensors[Q].scales_differing == 1


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_or_non_finite_scale_is_caught(bad, value):
    patch(bad, Q + "_scale_inv", 0, struct.pack("<f", value))
    rep = verify_checkpoint(bad)
    assert [e for e in rep.errors if Q + "_scale_inv" in e and "finite and > 0" in e]


def test_missing_scale_is_caught(bad):
    rewrite(bad, Q, lambda t: t.pop(Q + "_scale_inv"))
    rep = verify_checkpoint(bad)
    assert [e for e in rep.errors if Q in e and "has no" in e and "_scale_inv" in e]
    assert len(rep.errors) == 1, rep.errors
    assert rep.tensors[Q].status == "FAIL"


def test_scale_of_wrong_shape_is_caught(bad):
    rewrite(bad, Q, lambda t: t.__setitem__(Q + "_scale_inv", torch.ones(9, 4)))
    rep = verify_checkpoint(bad)
    assert [e for e in rep.errors if Q + "_scale_inv" in e and "[9, 4]" in e and "[9, 3]" in e]


def test_bf16_where_fp8_expected_is_caught(tiny, bad):
    state = tiny[2]

    def to_bf16(t):
        t[Q] = state[Q]
        t.pop(Q + "_scale_inv")
    rewrite(bad, Q, to_bf16)
    rep = verify_checkpoint(bad)
    assert [e for e in rep.errors if Q in e and "BF16" in e and "modules_to_not_convert" in e]


def test_fp8_module_listed_unconverted_is_caught(bad):
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"] = ["lm_head", "model.layers.0.mlp"]
    cfg["quantization_config"]["ignored_layers"] = ["lm_head", "model.layers.0.mlp"]
    (bad / "config.json").write_text(json.dumps(cfg))
    rep = verify_checkpoint(bad)
    assert [e for e in rep.errors if Q in e and "matched by modules_to_not_convert" in e]


def test_missing_index_entry_is_caught(bad):
    index = read_index(bad)
    del index["weight_map"][Q]
    (bad / INDEX).write_text(json.dumps(index))
    rep = verify_checkpoint(bad)
    assert [e for e in rep.errors if Q in e and "missing from" in e and "weight_map" in e]
    assert rep.tensors[Q].status == "FAIL"


def test_index_pointing_at_missing_tensor_and_wrong_total_are_caught(bad):
    index = read_index(bad)
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = index["weight_map"][Q]
    index["metadata"]["total_size"] += 1
    (bad / INDEX).write_text(json.dumps(index))
    rep = verify_checkpoint(bad)
    assert [e for e in rep.errors if "model.layers.0.mlp.extra.weight" in e]
    assert [e for e in rep.errors if "total_size" in e]


def test_wrong_vocab_size_is_caught(bad):
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vocab_size"] = 1024
    (bad / "config.json").write_text(json.dumps(cfg))
    rep = verify_checkpoint(bad)
    assert [e for e in rep.errors if "model.embed_tokens.weight" in e and "1003" in e and "vocab_size" in e]


def test_tie_word_embeddings_with_lm_head_is_caught(bad):
    cfg = json.loads((bad / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (bad / "config.json").write_text(json.dumps(cfg))
    rep = verify_checkpoint(bad)
    assert [e for e in rep.errors if "tie_word_embeddings" in e and "lm_head.weight" in e]


def test_quantization_config_fields_are_checked(bad):
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [64, 64]
    cfg["quantization_config"]["activation_scheme"] = "static"
    (bad / "config.json").write_text(json.dumps(cfg))
    rep = verify_checkpoint(bad)
    assert [e for e in rep.errors if "weight_block_size" in e]
    assert [e for e in rep.errors if "activation_scheme" in e]


def test_fp8_without_quantization_config_is_caught(bad):
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["quantization_config"]
    (bad / "config.json").write_text(json.dumps(cfg))
    rep = verify_checkpoint(bad)
    assert [e for e in rep.errors if Q in e and "no quantization_config" in e]


def test_input_scale_is_caught(bad):
    name = "model.layers.0.mlp.gate_proj.input_scale"
    rewrite(bad, Q, lambda t: t.__setitem__(name, torch.ones(())))
    rep = verify_checkpoint(bad)
    assert [e for e in rep.errors if name in e]


def test_serve_tp_required_makes_failure(tiny):
    out = tiny[1]
    rep = verify_checkpoint(out, serve_tp=(2,))
    assert not rep.ok
    assert [e for e in rep.errors if "q_proj" in e and "384/2 = 192" in e]
    assert verify_checkpoint(out).ok
    assert verify_checkpoint(out, serve_tp=(1,)).ok


def test_matching_rule_agrees_with_transformers():
    qu = pytest.importorskip("transformers.quantizers.quantizers_utils")
    pats = ["lm_head", "model.layers.1", "mlp.gate", r"layers\.0\..*k_proj"]
    for name in ("lm_head", "model.layers.1.mlp.up_proj", "model.layers.11.mlp.up_proj", "model.layers.0.mlp.gate",
                 "model.layers.0.mlp.gate_proj", "model.layers.0.self_attn.k_proj", "model.layers.2.self_attn.k_proj"):
        assert should_convert_module(name, pats) == qu.should_convert_module(name, pats), name


def test_unquantized_export_passes_and_fp8_in_it_fails(tiny, tmp_path):
    src, _, state = tiny
    cfg = tiny_hf_config("qwen3")
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in state.items()]
    w = CheckpointWriter(tmp_path / "plain", specs)
    for n, t in state.items():
        w.write(n, t)
    out = w.finish({"config.json": config_json(cfg, cfg.vocab_size, False, torch.bfloat16, None)})
    rep = verify_checkpoint(out, source=src)
    assert rep.ok, rep.table()
    assert rep.counts()["quantized"] == 0 and rep.counts()["exact"] == 25


def test_missing_source_and_out_dir_are_errors(tiny, tmp_path):
    rep = verify_checkpoint(tiny[1], source=tmp_path)
    assert [e for e in rep.errors if "--source" in e]
    assert not verify_checkpoint(tmp_path / "nowhere").ok
    assert main([str(tmp_path / "nowhere")]) == 1


def test_small_rounding_difference_is_within_bound(tiny, bad):
    src, _, state = tiny
    q, _ = quantize_blockfp8(state[Q])
    mid = ((q.float().abs() >= 16) & (q.float().abs() < 32)).reshape(-1).nonzero()[0].item()
    byte = q.view(torch.uint8).reshape(-1)[mid].item()
    patch(bad, Q, mid, bytes([byte ^ 0x01]))                      # one e4m3 ulp (2) at |q| in [16, 32)
    rep = verify_checkpoint(bad, source=src)                       # exact by default: a changed byte fails
    assert not rep.ok and rep.tensors[Q].status == "FAIL"
    assert [e for e in rep.errors if Q in e and "within the e4m3 bound" in e]
    assert "--tolerance bound" in rep.table()
    assert main([str(bad), "--source", str(src), "--no-load"]) == 1
    rep = verify_checkpoint(bad, source=src, tolerance="bound")
    assert rep.ok, rep.table()
    assert rep.tensors[Q].status == "within-bound" and 0 < rep.tensors[Q].max_err_ratio <= 1 + BOUND_SLACK
    assert [w for w in rep.warnings if Q in w] and rep.counts()["within_bound"] == 1
    assert main([str(bad), "--source", str(src), "--tolerance", "bound", "--no-load"]) == 0


def test_truncated_shard_is_caught(bad):
    path = file_of(bad, Q)
    path.write_bytes(path.read_bytes()[:-10])
    rep = verify_checkpoint(bad)
    assert [e for e in rep.errors if path.name in e and "truncated" in e]


def test_untied_quantized_lm_head_compares_to_the_tied_source_embedding(tmp_path):
    cfg = tiny_hf_config("qwen3", tie_embeddings=True)
    state = random_hf_state(cfg)
    assert "lm_head.weight" not in state
    out = write_output(cfg, {**state, "lm_head.weight": state["model.embed_tokens.weight"]}, tmp_path / "o", [])
    rep = verify_checkpoint(out, source=DictReader(state))
    assert rep.ok, rep.table()
    assert rep.tensors["lm_head.weight"].quantized and rep.tensors["lm_head.weight"].status == "exact"
    assert [p.module for p in rep.transformers] == ["lm_head"]                # 1003 rows
