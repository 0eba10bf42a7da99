"""``iter_fp8``: the in-memory stream yields every tensor of the file export, with identical bytes, on rank 0."""
import re

import pytest
import transformers as tf

from helpers import torchrun, write_hf_source

RAGGED = dict(vocab_size=1003, hidden_size=320, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=80, max_position_embeddings=256)


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
