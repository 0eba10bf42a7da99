"""``iter_fp8``: the in-memory stream yields every tensor of the file export, with identical bytes, on rank 0;
``iter_fp8_buckets`` the same pairs in order, in buckets within their byte bound; both equal the single-process
reference quantization of the source byte for byte under TP, PP and EP, and a pass stopped early leaves the job
able to stream again."""
import json
import re

import pytest
import transformers as tf

from helpers import ragged_qwen3_moe, torchrun, write_hf_source

RAGGED = dict(vocab_size=1003, hidden_size=320, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=80, max_position_embeddings=256)
BUCKET = 300_000    # below the embedding's 642 KB (1003 x 320 bf16): that one comes alone


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_iter_fp8_matches_files(tmp_path, tp, pp):
    src = tmp_path / "src"
    write_hf_source(src, tf.LlamaConfig(**RAGGED))
    r = torchrun(tp * pp, ["iter", str(src), str(tmp_path / "out"), str(tp), str(pp)], script="tests/dist/worker.py")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = re.search(r"ITER_FP8 tensors=(\d+) mismatched=\[\] missing=\[\]", r.stdout)
    assert m, r.stdout[-2000:]
    # 2 layers x (7 linears x 2 + 2 norms) + embed + norm + lm_head
    assert int(m.group(1)) == 2 * (7 * 2 + 2) + 3


def _stream(tmp_path, cfg, tp, pp, ep) -> dict:
    src = tmp_path / "src"
    write_hf_source(src, cfg)
    r = torchrun(tp * pp * ep, [str(src), str(tp), str(pp), str(ep), str(BUCKET)],
                 script="tests/dist/stream_worker.py")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = re.search(r"^STREAM (.*)$", r.stdout, re.M)
    assert m, r.stdout[-2000:]
    return json.loads(m.group(1))


def _check(report: dict, tensors: int, fp8: int) -> None:
    assert report["bad"] == [] and report["dup"] == [] and report["missing"] == [] and report["extra"] == [], report
    assert report["tensors"] == tensors and report["fp8"] == fp8, report
    assert report["buckets_equal"] and report["over"] == [] and report["alone"] >= 1, report
    assert 1 < report["buckets"] < tensors, report
    assert report["early"] and report["after"], report


def test_stream_and_buckets_tp2_reference(tmp_path):
    # 2 layers x (7 linears x 2 + 2 norms) + embed + norm + lm_head
    _check(_stream(tmp_path, tf.LlamaConfig(**RAGGED), 2, 1, 1), 2 * 16 + 3, 2 * 7)


def test_stream_and_buckets_ep2_reference(tmp_path):
    # per layer: q k v o (+ scales), q/k norms, 2 norms, router, 4 experts x 3 linears (+ scales)
    _check(_stream(tmp_path, ragged_qwen3_moe(), 1, 1, 2), 2 * (4 * 2 + 2 + 2 + 1 + 4 * 3 * 2) + 3, 2 * (4 + 12))
