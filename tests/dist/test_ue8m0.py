"""quant.scale_fmt=ue8m0 (power-of-two block scales) through the real CLI and the in-process API: byte-identical to
the single-process reference in that mode on a ragged model (hidden 320, intermediate 704, head_dim 80, vocab 1003),
every scale a power of two, quantization_config saying so, and verify accepting it. The module's exports run from one
torchrun launch (tests/jobs.py), each in processes of its own."""
import json

import pytest
import torch
import transformers as tf

from helpers import RAGGED, mismatches, read_output
from jobs import Job

LAYOUTS = [(2, 1), (2, 2)]
JOBS = {f"test_cli_export_ue8m0_byte_identical[{i}]": Job(tp * pp, [f"parallel.tp={tp}", f"parallel.pp={pp}",
                                                                     "output.max_shard_size=1MB",
                                                                     "quant.scale_fmt=ue8m0"], tf.LlamaConfig(**RAGGED))
        for i, (tp, pp) in zip(["tp2", "tp2pp2"], LAYOUTS)}
# pp=2 at tp=1 through the in-process API (tests/dist/worker.py builds the Megatron model and calls export)
JOBS["test_in_process_api_ue8m0"] = Job(2, ["api", "{src}", "{out}", "1", "2", "ue8m0"], tf.LlamaConfig(**RAGGED),
                                        script="tests/dist/worker.py")


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


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=["tp2", "tp2pp2"])
def test_cli_export_ue8m0_byte_identical(exports, request, tp, pp):
    r = exports[request.node.name]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _check_ue8m0_output(r.out, r.state)
    assert ": OK" in r.stdout and "within e4m3 bound    0" in r.stdout and "failed               0" in r.stdout
    assert "scale_fmt            ue8m0" in r.stdout


def test_in_process_api_ue8m0(exports, request):
    """pp=2 at tp=1: whole tensors on one rank go through the fused single-pass quantizer."""
    r = exports[request.node.name]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _check_ue8m0_output(r.out, r.state)


def test_unknown_scale_fmt_is_refused_naming_the_key():
    from megatron_fp8pb.config import load_config
    with pytest.raises(ValueError, match=r"quant.scale_fmt='e8m0': choose one of amax, ue8m0"):
        load_config(None, ["quant.scale_fmt=e8m0"])
