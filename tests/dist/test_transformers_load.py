"""transformers loads what the export wrote, and its logits match the bf16 source within FP8 error. Full dims are
multiples of 128 (transformers' dequantizer needs that) while the TP=2 shards are not (192 q rows, 576 gate rows).
The module's exports run from one torchrun launch (tests/jobs.py), each in processes of its own."""
import pytest

from jobs import Job
from megatron_fp8pb.sources.tiny import tiny_hf_config
from megatron_fp8pb.verify import verify_checkpoint

CASES = [("qwen3", False), ("llama", True)]
JOBS = {**{f"test_transformers_logits_match_source[{arch}-{tie}]": Job(2, ["parallel.tp=2"],
                                                                      tiny_hf_config(arch, tie_embeddings=tie))
           for arch, tie in CASES},
        "test_default_tiny_export_prints_verification": Job(2, ["parallel.tp=2"])}


@pytest.mark.parametrize("arch,tie", CASES)
def test_transformers_logits_match_source(exported, arch, tie):
    assert exported.returncode == 0, exported.log()
    src, out = exported.src, exported.out
    report = verify_checkpoint(out, source=src, logits=True)
    assert report.ok, report.table()
    lg = report.logits
    assert lg["rel_err"] < 0.1 and lg["top1"] >= 0.9, lg
    assert lg["rel_err"] > 0.0    # the FP8 model really is a different model
    assert lg["to_ref"] == lg["w8a8_to_ref"] == 0.0    # and exactly the reference quantization of the source


def test_default_tiny_export_prints_verification(exported):
    assert exported.returncode == 0, exported.log()
    r = exported
    assert "verification" in r.stdout and ": OK" in r.stdout
    assert "exact" in r.stdout
