"""Bad input is refused with a message naming the thing and the fix, and nothing is written."""
import json

import pytest
import transformers as tf
from safetensors.torch import load_file, save_file

from helpers import torchrun, write_hf_source

RAGGED = dict(vocab_size=1003, hidden_size=320, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=80, max_position_embeddings=256)


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "src"
    write_hf_source(path, tf.LlamaConfig(**RAGGED))
    return path


def _run(src, out, *extra, nproc=2):
    return torchrun(nproc, ["source.kind=hf", f"source.path={src}", "parallel.tp=2", f"output.dir={out}", *extra])


def _drop_tensor(src, name):
    index = json.loads((src / "model.safetensors.index.json").read_text())
    f = src / index["weight_map"][name]
    tensors = load_file(str(f))
    del tensors[name]
    save_file(tensors, str(f))


def test_missing_tensor(src, tmp_path):
    _drop_tensor(src, "model.layers.1.mlp.down_proj.weight")
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


def test_impossible_layout_shows_arithmetic(src, tmp_path):
    r = _run(src, tmp_path / "out", "parallel.tp=4", nproc=4)
    assert r.returncode != 0
    assert "num_key_value_heads(2) % tp(4)" in r.stderr
    r = _run(src, tmp_path / "out", "parallel.pp=2", nproc=2)
    assert r.returncode != 0
    assert "world size(2) % (tp(2) * pp(2))" in r.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_key_and_wrong_type(src, tmp_path):
    r = _run(src, tmp_path / "out", "parallel.tpp=2", nproc=1)
    assert r.returncode != 0 and "parallel.tpp" in r.stderr
    r = _run(src, tmp_path / "out", "parallel.pp=two", nproc=1)
    assert r.returncode != 0 and "parallel.pp" in r.stderr


def test_existing_output_dir_refused(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    r = _run(src, out)
    assert r.returncode != 0 and "output.overwrite=true" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_output_inside_source_refused(src):
    r = _run(src, src / "fp8")
    assert r.returncode != 0 and "inside source.path" in r.stderr
    assert not (src / "fp8").exists()


def test_unwritable_output_parent_refused(src, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = _run(src, blocker / "out")
    assert r.returncode != 0 and "not a writable directory" in r.stderr
