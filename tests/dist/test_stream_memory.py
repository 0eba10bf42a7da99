"""A streamed HF source keeps every rank's peak RSS within a fixed budget, whatever the model's depth: two sources
of the same width, 2 and 12 layers (the deeper one 250 MB larger), add the same peak RSS on every rank (measured from the start of the export, so that imports do not count).
"""
import re

import transformers as tf

from helpers import mismatches, torchrun, write_hf_source

WIDE = dict(vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=8,
            max_position_embeddings=256)
GROWTH = 32e6     # a rank's peak may grow by this while the source grows by ~250 MB (loaded whole: ~340 MB)
BUDGET = 160e6    # what the export may add on any rank: staging slabs (3 x 64 MiB on rank 0) plus two units


def _peak_rss(tmp_path, layers):
    src = tmp_path / f"src{layers}"
    state = write_hf_source(src, tf.LlamaConfig(num_hidden_layers=layers, **WIDE))
    out = tmp_path / f"out{layers}"
    r = torchrun(2, ["source.kind=hf", f"source.path={src}", "parallel.tp=2", f"output.dir={out}",
                     "output.verify=false"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert mismatches(out, state) == []
    assert f"quantized {layers + 2}/{layers + 2} units" in r.stdout and "GB/s" in r.stdout and "ETA" in r.stdout
    assert "phases: read" in r.stdout and "model-00001-of-00001.safetensors" in r.stdout
    source_bytes = sum(t.numel() * t.element_size() for t in state.values())
    added = re.search(r"the export added: ([\d. ]+) GB", r.stdout).group(1)
    rss = [float(x) * 1e9 for x in added.split()]
    return source_bytes, rss


def test_peak_rss_flat_in_depth(tmp_path):
    small_bytes, small = _peak_rss(tmp_path, 2)
    big_bytes, big = _peak_rss(tmp_path, 12)
    assert big_bytes - small_bytes > 200e6
    growth = [b - s for b, s in zip(big, small)]
    print(f"peak RSS per rank (MB): 2 layers {[round(x / 1e6) for x in small]}, 12 layers {[round(x / 1e6) for x in big]}")
    assert max(small + big) < BUDGET, f"the export added {[round(x / 1e6) for x in small + big]} MB"
    assert max(growth) < GROWTH, f"peak RSS per rank grew by {[g / 1e6 for g in growth]} MB for " \
                                 f"{(big_bytes - small_bytes) / 1e6:.0f} MB more source"
