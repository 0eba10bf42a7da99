"""verify on a ``scale_fmt: ue8m0`` checkpoint: accepted when every scale is a power of two and the bytes match the
ue8m0 reference; a non-power-of-two scale, an amax/448 checkpoint labelled ue8m0 and an unknown scale_fmt fail."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from megatron_fp8pb.sources.hf import DictReader
from megatron_fp8pb.verify import main, verify_checkpoint

from fp8_checkpoints import Q, data_offset, file_of, tiny_checkpoint, write_output

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("verify_ue8m0"), scale_fmt="ue8m0")


def test_ue8m0_checkpoint_passes_byte_exact(tiny, tmp_path):
    cfg, state, src, out = tiny
    assert json.loads((out / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"
    rep = verify_checkpoint(out, source=src)
    assert rep.ok, rep.table()
    c = rep.counts()
    assert c["exact"] == c["checked"] == 25 and c["quantized"] == 14 and c["within_bound"] == 0
    assert rep.scale_fmt == "ue8m0" and "scale_fmt            ue8m0" in rep.table()
    assert not [w for w in rep.warnings if "does not define" in w]
    assert verify_checkpoint(out, source=DictReader(state)).ok
    report = tmp_path / "r.json"
    assert main([str(out), "--source", str(src), "--json", str(report)]) == 0
    assert json.loads(report.read_text())["scale_fmt"] == "ue8m0"


def test_non_power_of_two_scale_is_caught_without_source(tiny, tmp_path):
    bad = Path(shutil.copytree(tiny[3], tmp_path / "bad"))
    sname = Q + "_scale_inv"
    path = file_of(bad, sname)
    at = data_offset(path, sname)
    old = struct.unpack("<f", path.read_bytes()[at + 4:at + 8])[0]
    with open(path, "r+b") as f:          # block (0, 1): the power of two times 1.5
        f.seek(at + 4)
        f.write(struct.pack("<f", old * 1.5))
    rep = verify_checkpoint(bad)
    assert not rep.ok
    errs = [e for e in rep.errors if sname in e and "not a power of two" in e]
    assert errs and "(0, 1)" in errs[0] and "quant.scale_fmt=ue8m0" in errs[0]
    assert rep.tensors[Q].status == "FAIL"


def test_amax_scales_labelled_ue8m0_fail(tiny, tmp_path):
    cfg, state, src, _ = tiny
    out = write_output(cfg, state, tmp_path / "mislabelled", scale_fmt="amax", qc_fmt="ue8m0")
    rep = verify_checkpoint(out, source=src)
    assert not rep.ok
    assert [e for e in rep.errors if Q in e and "not a power of two" in e]


def test_ue8m0_scales_without_the_key_are_compared_as_amax(tiny, tmp_path):
    """ue8m0 scales in a checkpoint that does not declare scale_fmt: the source comparison uses amax/448 and
    every quantized tensor differs in its scales."""
    cfg, state, src, _ = tiny
    out = write_output(cfg, state, tmp_path / "undeclared", scale_fmt="ue8m0", qc_fmt="amax")
    assert "scale_fmt" not in json.loads((out / "config.json").read_text())["quantization_config"]
    rep = verify_checkpoint(out, source=src)
    assert rep.tensors[Q].scales_differing > 0 and rep.tensors[Q].status != "exact"


def test_transformers_float_scale_fmt_means_amax(tiny, tmp_path):
    """transformers writes "scale_fmt": "float" for float32 amax/448 scales: compared as the default format."""
    cfg, state, src, _ = tiny
    out = write_output(cfg, state, tmp_path / "float", scale_fmt="amax")
    conf = json.loads((out / "config.json").read_text())
    conf["quantization_config"]["scale_fmt"] = "float"
    (out / "config.json").write_text(json.dumps(conf))
    rep = verify_checkpoint(out, source=src)
    assert rep.ok and rep.scale_fmt == "amax" and rep.counts()["exact"] == 25, rep.table()


@pytest.mark.parametrize("value", ["e8m0", None, "UE8M0"])
def test_unknown_scale_fmt_is_an_error(tiny, tmp_path, value):
    bad = Path(shutil.copytree(tiny[3], tmp_path / "bad"))
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["scale_fmt"] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    rep = verify_checkpoint(bad)
    assert [e for e in rep.errors if "quantization_config.scale_fmt" in e and json.dumps(value) in e]


def test_ue8m0_checkpoint_loads_in_transformers(tiny):
    """transformers reads quantization_config (scale_fmt included) and dequantizes our float32 power-of-two scales;
    its logits match the source's."""
    _, _, src, out = tiny
    rep = verify_checkpoint(out, source=src, logits=True)
    assert rep.ok and rep.logits["ok"], rep.logits
