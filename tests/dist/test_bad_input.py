"""Bad input is refused with a message naming the thing and the fix, and nothing is written.

Refusals that need a built model (a missing tensor, a config that disagrees with the weights) go through the real
CLI; those decided from the config alone are checked in-process (test_refusals.py covers how the CLI prints them)."""
import json

import pytest
import transformers as tf

from helpers import RAGGED, drop_source_tensor, torchrun, write_hf_source
from megatron_fp8pb.archs import dims_from_hf
from megatron_fp8pb.config import load_config
from megatron_fp8pb.validate import check_layout
from megatron_fp8pb.writer import prepare_output


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "src"
    write_hf_source(path, tf.LlamaConfig(**RAGGED))
    return path


def _run(src, out, *extra, nproc=2):
    return torchrun(nproc, ["source.kind=hf", f"source.path={src}", "parallel.tp=2", f"output.dir={out}", *extra])


def test_missing_tensor(src, tmp_path):
    drop_source_tensor(src, "model.layers.1.mlp.down_proj.weight")
    r = _run(src, tmp_path / "out")
    assert r.returncode != 0
    assert "model.layers.1.mlp.down_proj.weight" in r.stderr + r.stdout
    assert not (tmp_path / "out").exists()


def test_config_disagrees_with_weights(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 768
    (src / "config.json").write_text(json.dumps(cfg))
    r = _run(src, tmp_path / "out")
    assert r.returncode != 0
    assert "disagree" in r.stderr + r.stdout and "gate_proj" in r.stderr + r.stdout
    assert not (tmp_path / "out").exists()


def test_impossible_layout_shows_arithmetic():
    d = dims_from_hf(tf.LlamaConfig(**RAGGED))
    with pytest.raises(ValueError, match=r"num_key_value_heads\(2\) % tp\(4\)"):
        check_layout(d, 4, tp=4, pp=1)
    with pytest.raises(ValueError, match=r"world size\(2\) % \(tp\(2\) \* pp\(2\)\)"):
        check_layout(d, 2, tp=2, pp=2)


def test_unknown_key_and_wrong_type():
    with pytest.raises(KeyError, match="parallel.tpp"):
        load_config(None, ["parallel.tpp=2"])
    with pytest.raises(TypeError, match="parallel.pp"):
        load_config(None, ["parallel.pp=two"])


def test_existing_output_dir_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="output.overwrite=true"):
        prepare_output(out, overwrite=False)
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_output_inside_source_refused(src):
    r = _run(src, src / "fp8", "parallel.tp=1", nproc=1)     # refused before any process group
    assert r.returncode != 0 and "inside source.path" in r.stderr
    assert not (src / "fp8").exists()


def test_unwritable_output_parent_refused(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="not a writable directory"):
        prepare_output(blocker / "out", overwrite=False)
