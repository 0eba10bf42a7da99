"""verify --logits keeps what the exporter can get wrong (bytes, scales, names: pass or fail) apart from what the
format costs (logits against bf16: reported beside the reference quantization of the same source, never failed)."""
from __future__ import annotations

from megatron_fp8pb.sources.hf import DictReader
from megatron_fp8pb.sources.tiny import random_hf_state, tiny_hf_config
from megatron_fp8pb.verify import is_linear_weight, main, verify_checkpoint
from megatron_fp8pb.verify.logits import failures

from fp8_checkpoints import Q, patch, rewrite, write_output, write_source

K = "model.layers.1.self_attn.k_proj.weight"


def _logit_errors(rep) -> list[str]:
    return [e for e in rep.errors if e.startswith("logits:")]


def test_byte_exact_checkpoint_reports_the_format_cost_and_passes(tiny):
    src, out, _ = tiny
    rep = verify_checkpoint(out, source=src, logits=True)
    assert rep.ok, rep.table()
    lg = rep.logits
    assert lg["to_ref"] == lg["w8a8_to_ref"] == 0.0             # the checkpoint's logits are the reference's
    assert lg["rel_err"] == lg["ref_rel_err"] > 0.0             # and the format does cost something
    assert lg["w8a8_rel_err"] == lg["ref_w8a8_rel_err"] > lg["rel_err"]
    assert lg["w8a8_linears"] == 14 and lg["failures"] == []
    table = rep.table()
    assert "logits               OK: identical to the reference quantization of the source" in table
    assert "fails when the checkpoint's rel err > the reference's x 1.02 or its top-1 < the reference's - 0.02" \
        in table
    assert "reported, never failed" in table


def test_byte_exact_checkpoint_with_flat_logits_never_fails(tmp_path, capsys):
    """Linears 4x larger than the tiny default: the format's own rounding moves top-1 well below 0.9."""
    cfg = tiny_hf_config("qwen3")
    state = {n: t * 4 if is_linear_weight(n, tuple(t.shape)) and n != "lm_head.weight" else t
             for n, t in random_hf_state(cfg).items()}
    src, out = write_source(cfg, state, tmp_path / "src"), write_output(cfg, state, tmp_path / "out")
    rep = verify_checkpoint(out, source=src, logits=True, load=False)
    assert rep.ok, rep.table()
    assert rep.logits["ref_top1"] < 0.9 and rep.logits["ref_w8a8_top1"] < 0.8 and rep.logits["ref_rel_err"] > 0.05
    assert main([str(out), "--source", str(src), "--logits", "--no-load"]) == 0
    printed = capsys.readouterr().out
    assert f"verify {out}: OK" in printed and "FAILED" not in printed


def test_scales_off_by_4x_fail_the_bytes_and_the_logits(tiny, bad):
    src, _, _ = tiny
    for name in (Q, K):
        rewrite(bad, name, lambda t, s=name + "_scale_inv": t.__setitem__(s, t[s] * 4))
    rep = verify_checkpoint(bad, source=src, logits=True, load=False)
    assert not rep.ok
    for name in (Q, K):
        assert rep.tensors[name].status == "FAIL" and rep.tensors[name].scales_differing > 0
    lg = rep.logits
    assert not lg["ok"] and lg["rel_err"] > lg["ref_rel_err"] * 1.02 and lg["to_ref"] > 0, lg
    assert _logit_errors(rep) and "further from bf16 than the reference quantization" in _logit_errors(rep)[0]
    table = rep.table()
    assert "logits               FAILED: further from bf16 than the reference quantization of the source" in table
    assert f"error: tensor {Q!r}" in table and f"error: tensor {K!r}" in table


def test_one_fp8_byte_or_one_scale_fails_naming_the_tensor(tiny, bad, capsys):
    src, _, state = tiny
    patch(bad, Q, 0, bytes([0x7E]))                           # 448 x the block scale where a small value was
    rewrite(bad, K, lambda t: t[K + "_scale_inv"].view(-1).__setitem__(0, t[K + "_scale_inv"].view(-1)[0] * 1.5))
    rep = verify_checkpoint(bad, source=src, logits=True, load=False)
    assert not rep.ok
    assert rep.tensors[Q].bytes_differing == 1 and rep.tensors[Q].scales_differing == 0
    assert rep.tensors[K].scales_differing == 1
    assert {n for n, r in rep.tensors.items() if r.status == "FAIL"} == {Q, K}
    lines = [line for line in rep.table().splitlines() if line.startswith("  error: tensor")]
    assert len(lines) == 2 and Q in lines[0] + lines[1] and K in lines[0] + lines[1]
    assert not any("layers.*" in line for line in lines)      # one layer each: named as they are
    assert rep.logits["to_ref"] > 0                           # measured, whatever the logits' verdict
    assert main([str(bad), "--source", str(src), "--logits", "--no-load"]) == 1
    printed = capsys.readouterr().out
    assert f"verify {bad}: FAILED" in printed and Q in printed and K in printed


def test_the_rule_compares_with_the_reference_and_its_slack():
    lg = dict(rel_err=0.1, top1=0.8, w8a8_rel_err=0.2, w8a8_top1=0.7, ref_rel_err=0.1, ref_top1=0.8,
              ref_w8a8_rel_err=0.2, ref_w8a8_top1=0.7, rel_err_slack=0.02, top1_slack=0.02)
    assert failures(lg) == []                                 # however far from bf16 the format itself is
    assert failures({**lg, "rel_err": 0.1019, "w8a8_top1": 0.681}) == []
    assert failures({**lg, "rel_err": 0.1021}) == ["W8A16 rel err 0.1021 > the reference quantization's 0.1 x 1.02"]
    assert failures({**lg, "w8a8_top1": 0.67}) == ["W8A8 top-1 0.670 < the reference quantization's 0.700 - 0.02"]
    assert failures({**lg, "rel_err": 0.05, "top1": 0.9}) == []  # better than the reference is not an error


def test_logits_without_a_source_directory_is_an_error(tiny):
    src, out, state = tiny
    rep = verify_checkpoint(out, source=DictReader(state), logits=True, load=False)
    assert _logit_errors(rep) == ["logits: --logits needs --source as an HF checkpoint directory"]
    assert "logits               FAILED: --logits needs --source" in rep.table()
