"""quant.scale_fmt=ue8m0 (power-of-two block scales) through the real CLI and the in-process API: byte-identical to
the single-process reference in that mode on a ragged model (hidden 320, intermediate 704, head_dim 80, vocab 1003),
every scale a power of two, quantization_config saying so, and verify accepting it."""
import json

import pytest
import torch
import transformers as tf

from helpers import RAGGED, mismatches, read_output, torchrun, write_hf_source

def _check_ue8m0_output(out, state) -> None:
    assert mismatches(out, state, scale_fmt="ue8m0") == []
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["scale_fmt"] == "ue8m0"
    scales = {n: t for n, t in read_output(out).items() if n.endswith("_scale_inv")}
    assert len(scales) == 14
    for n, s in scales.items():
        m, _ = torch.frexp(s.double())
        assert s.dtype == torch.float32 and bool((m == 0.5).all()), n
    # the mode changes the output: amax/448 scales are not all powers of two
    assert mismatches(out, state) != []


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)], ids=["tp2", "tp2pp2"])
def test_cli_export_ue8m0_byte_identical(tmp_path, tp, pp):
    src = tmp_path / "src"
    state = write_hf_source(src, tf.LlamaConfig(**RAGGED))
    out = tmp_path / "out"
    r = torchrun(tp * pp, ["source.kind=hf", f"source.path={src}", f"parallel.tp={tp}", f"parallel.pp={pp}",
                           f"output.dir={out}", "output.max_shard_size=1MB", "quant.scale_fmt=ue8m0"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _check_ue8m0_output(out, state)
    assert ": OK" in r.stdout and "within e4m3 bound    0" in r.stdout and "failed               0" in r.stdout
    assert "scale_fmt            ue8m0" in r.stdout


def test_in_process_api_ue8m0(tmp_path):
    """pp=2 at tp=1: whole tensors on one rank go through the fused single-pass quantizer."""
    src = tmp_path / "src"
    state = write_hf_source(src, tf.LlamaConfig(**RAGGED))
    out = tmp_path / "out"
    r = torchrun(2, ["api", str(src), str(out), "1", "2", "ue8m0"], script="tests/dist/worker.py")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _check_ue8m0_output(out, state)


def test_unknown_scale_fmt_is_refused_naming_the_key():
    from megatron_fp8pb.config import load_config
    with pytest.raises(ValueError, match=r"quant.scale_fmt='e8m0': choose one of amax, ue8m0"):
        load_config(None, ["quant.scale_fmt=e8m0"])
