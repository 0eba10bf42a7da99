"""MiniMax-M2 from Megatron sources (real gloo torchrun, megatron-core 0.16 on CPU): the full-width q/k norm module
(``FullWidthRMSNorm``) at tp=2 against transformers' RMSNorm of the whole vector; a megatron-core model built from HF
weights exported with the in-process API and streamed with ``iter_fp8`` at (tp, ep, etp, pp) = (2,2,1,1), (1,1,1,2),
(2,1,1,2), byte for byte the single-process reference; Megatron dist checkpoints saved at one layout and exported at
another. Dims are not multiples of 128 (hidden 320, heads of 80, q_norm 320 wide: 160 a rank at tp=2)."""
import json
import re

import pytest

from helpers import mismatches, torchrun, write_hf_source
from test_dist_ckpt_stream import _check_resharded, _save

from megatron_fp8pb.sources.tiny import tiny_hf_config


def _cfg(**kw):
    """The tiny MiniMax-M2 with ``kw`` changed."""
    from megatron_fp8pb.archs import arch
    return arch("minimax_m2").tiny["minimax_m2"](False, **kw)


def test_full_width_norm_at_tp2():
    """Query heads split 2 + 2; kv heads 1 + 1, and a single kv head held by both ranks (megatron-core's layout
    where kv heads < tp: saved once, the second rank a replica). Forward and input gradient as one process computes
    them over the whole width; the sharded state dict places each rank's slice in the full weight."""
    r = torchrun(2, [], script="tests/dist/qk_norm_worker.py")
    rows = [json.loads(line[len("NORM "):]) for line in r.stdout.splitlines() if line.startswith("NORM ")]
    assert r.returncode == 0 and len(rows) == 8, r.stdout[-2000:] + r.stderr[-3000:]
    for row in rows:
        assert row["out_err"] < 1e-5 and row["grad_err"] < 1e-4, row
        rank, width = row["rank"], 80 * (row["heads"] if row["which"] == "query" else row["kv"])
        assert row["global_shape"] == [width], row
        if row["which"] == "key" and row["kv"] == 1:
            assert row["local"] == [80] and row["global_offset"] == [0] and row["replica_id"] == [0, rank, 0], row
            assert row["style"] is False, row    # not split along tp: the export maps no rule to it
        else:
            assert row["local"] == [width // 2] and row["global_offset"] == [rank * width // 2], row
            assert row["replica_id"] == [0, 0, 0] and row["style"] is True, row


LAYOUTS = [(2, 2, 1, 1, 2), (1, 1, 1, 2, 2), (2, 1, 1, 2, 4)]   # (tp, ep, etp, pp, world)


@pytest.mark.parametrize("tp,ep,etp,pp,world", LAYOUTS, ids=[f"tp{a}ep{b}etp{c}pp{d}" for a, b, c, d, _ in LAYOUTS])
def test_megatron_model_byte_identical(tmp_path, tp, ep, etp, pp, world):
    """The export of the megatron-core model (q_norm / k_norm from ``self_attention.q_layernorm`` /
    ``k_layernorm``, split along heads) is the reference of the HF weights it was built from, and ``iter_fp8`` yields
    the same bytes as the files, each tensor once."""
    src, out = tmp_path / "src", tmp_path / "out"
    state = write_hf_source(src, tiny_hf_config("minimax_m2"))
    r = torchrun(world, [str(src), str(out), str(tp), str(ep), str(etp), str(pp)],
                 script="tests/dist/mcore_layout_worker.py")
    m = re.search(r"ITER_FP8 tensors=(\d+) mismatched=(\S+) missing=(\S+) in_file_order=(\S+)", r.stdout)
    assert r.returncode == 0 and m, r.stdout[-3000:] + r.stderr[-3000:]
    assert m.group(2) == "[]" and m.group(3) == "[]", m.group(0)
    assert mismatches(out, state) == []
    assert {"model.layers.1.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"} <= set(state)


@pytest.mark.parametrize("case,save,export", [("tp2_to_pp2", (2, 1, 1), (1, 2, 1)),
                                              ("ep2_to_tp2", (1, 1, 2), (2, 1, 1)),
                                              ("one_kv_head_pp2_to_ep2", (1, 2, 1), (1, 1, 2))],
                         ids=lambda v: v if isinstance(v, str) else None)
def test_dist_checkpoint_resharded(tmp_path, case, save, export):
    """Saved at tp=2 (each rank half of q_norm and of k_norm) and exported at pp=2; saved at ep=2 and exported at
    tp=2; with one kv head saved at pp=2 and exported at ep=2. Byte for byte the reference, and the same files as
    megatron-core's own load of the whole model at the export layout."""
    cfg = _cfg(num_key_value_heads=1) if case.startswith("one_kv_head") else tiny_hf_config("minimax_m2")
    src, ckpt, state = _save(tmp_path, cfg, 2, *save)
    _check_resharded(tmp_path, src, ckpt, state, export)


def test_fewer_kv_heads_than_tp_refused(tmp_path):
    """One kv head at tp=2: megatron-core would split linear_qkv inside the query group and hold the kv head on
    both ranks, which the export does not map; refused in one line that shows the arithmetic and the way out."""
    src = tmp_path / "src"
    write_hf_source(src, _cfg(num_key_value_heads=1))
    (tmp_path / "ckpt").mkdir()
    r = torchrun(2, ["source.kind=megatron", f"source.path={tmp_path / 'ckpt'}", f"source.hf_config={src}/config.json",
                     f"output.dir={tmp_path / 'out'}", "parallel.tp=2"])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode != 0 and len(errors) == 1, r.stderr[-3000:]
    assert "num_key_value_heads(1) % tp(2)" in errors[0] and "choose parallel.tp" in errors[0], errors[0]
