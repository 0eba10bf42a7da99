"""transformers loads what the export wrote, and its logits match the bf16 source within FP8 error. Full dims are
multiples of 128 (transformers' dequantizer needs that) while the TP=2 shards are not (192 q rows, 576 gate rows)."""
import pytest

from helpers import torchrun, write_hf_source
from megatron_fp8pb.tiny import tiny_hf_config
from megatron_fp8pb.verify import verify_checkpoint


@pytest.mark.parametrize("arch,tie", [("qwen3", False), ("llama", True)])
def test_transformers_logits_match_source(tmp_path, arch, tie):
    src = tmp_path / "src"
    write_hf_source(src, tiny_hf_config(arch, tie_embeddings=tie))
    out = tmp_path / "out"
    r = torchrun(2, ["source.kind=hf", f"source.path={src}", "parallel.tp=2", f"output.dir={out}"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = verify_checkpoint(out, source=src, logits=True)
    assert report.ok, report.table()
    lg = report.logits
    assert lg["rel_err"] < 0.1 and lg["top1"] >= 0.9, lg
    assert lg["rel_err"] > 0.0    # the FP8 model really is a different model


def test_default_tiny_export_prints_verification(tmp_path):
    out = tmp_path / "out"
    r = torchrun(2, ["parallel.tp=2", f"output.dir={out}"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "verification" in r.stdout and ": OK" in r.stdout
    assert "exact" in r.stdout
