"""Bad input is refused with a message naming the thing and the fix, and nothing is written.

Refusals that need the source's tensors (a missing tensor, a config that disagrees with the weights) go through the
real CLI (launch/export.py in processes of their own, started by one torchrun launch for the module: tests/jobs.py);
those decided from the config alone are checked in-process (test_refusals.py covers how the CLI prints them)."""
import json

import pytest
import transformers as tf

from helpers import RAGGED, drop_source_tensor
from jobs import Job
from megatron_fp8pb.archs import dims_from_hf
from megatron_fp8pb.config import load_config
from megatron_fp8pb.plan.validate import check_layout
from megatron_fp8pb.output.writer import prepare_output


def _wrong_intermediate_size(src):
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 768
    (src / "config.json").write_text(json.dumps(cfg))


JOBS = {
    "test_missing_tensor": Job(2, ["parallel.tp=2"], tf.LlamaConfig(**RAGGED),
                               edit=lambda src: drop_source_tensor(src, "model.layers.1.mlp.down_proj.weight")),
    "test_config_disagrees_with_weights": Job(2, ["parallel.tp=2"], tf.LlamaConfig(**RAGGED),
                                              edit=_wrong_intermediate_size),
    # refused before any process group
    "test_output_inside_source_refused": Job(1, ["parallel.tp=1", "output.dir={src}/fp8"], tf.LlamaConfig(**RAGGED)),
}


@pytest.fixture
def refused(exported):
    return exported


def test_missing_tensor(refused):
    r = refused
    assert r.returncode != 0
    assert "model.layers.1.mlp.down_proj.weight" in r.stderr + r.stdout
    assert not r.out.exists()


def test_config_disagrees_with_weights(refused):
    r = refused
    assert r.returncode != 0
    assert "disagree" in r.stderr + r.stdout and "gate_proj" in r.stderr + r.stdout
    assert not r.out.exists()


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


def test_output_inside_source_refused(refused):
    r = refused
    assert r.returncode != 0 and "inside source.path" in r.stderr
    assert not (r.src / "fp8").exists()


def test_unwritable_output_parent_refused(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="not a writable directory"):
        prepare_output(blocker / "out", overwrite=False)
