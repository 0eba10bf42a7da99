"""The other two ways in: a Megatron distributed checkpoint saved at one layout and exported at another, and the
in-process API called from inside a Megatron job."""
import json

import transformers as tf

from helpers import RAGGED, mismatches, torchrun, write_hf_source

def test_megatron_checkpoint_resharded(tmp_path):
    src = tmp_path / "src"
    state = write_hf_source(src, tf.LlamaConfig(**RAGGED))
    ckpt = tmp_path / "mcore"
    r = torchrun(2, ["save", str(src), str(ckpt), "2", "1"], script="tests/dist/worker.py")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    r = torchrun(2, ["source.kind=megatron", f"source.path={ckpt}", f"source.hf_config={src}/config.json",
                     "parallel.pp=2", f"output.dir={out}"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert mismatches(out, state) == []
    assert json.loads((out / "generation_config.json").read_text()) == {"max_new_tokens": 7}


def test_in_process_api_matches_reference(tmp_path):
    src = tmp_path / "src"
    state = write_hf_source(src, tf.Qwen3Config(tie_word_embeddings=True, **RAGGED))
    out = tmp_path / "out"
    r = torchrun(2, ["api", str(src), str(out), "2", "1"], script="tests/dist/worker.py")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "API_EXPORT_OK" in r.stdout
    assert mismatches(out, state) == []
    assert len([f for f in out.iterdir() if f.suffix == ".safetensors"]) > 1


def test_megatron_checkpoint_of_another_architecture(tmp_path):
    src = tmp_path / "src"
    write_hf_source(src, tf.LlamaConfig(**RAGGED))
    ckpt = tmp_path / "mcore"
    r = torchrun(2, ["save", str(src), str(ckpt), "2", "1"], script="tests/dist/worker.py")
    assert r.returncode == 0, r.stderr[-3000:]
    other = tmp_path / "other"
    other.mkdir()
    tf.LlamaConfig(**dict(RAGGED, intermediate_size=768)).save_pretrained(str(other))
    out = tmp_path / "out"
    r = torchrun(2, ["source.kind=megatron", f"source.path={ckpt}", f"source.hf_config={other}", "parallel.tp=2",
                     f"output.dir={out}"])
    assert r.returncode != 0
    assert "does not fit the architecture of source.hf_config" in r.stderr and "linear_fc1" in r.stderr
    assert not out.exists()


def test_megatron_checkpoint_keeps_its_vocab_padding(tmp_path):
    """Saved at tp=2 the vocabulary of 1100 pads to 1280 rows; exported at tp=1 Megatron would pad to 1152. The
    export reuses the checkpoint's padding and still strips it."""
    src = tmp_path / "src"
    state = write_hf_source(src, tf.LlamaConfig(**dict(RAGGED, vocab_size=1100)))
    ckpt = tmp_path / "mcore"
    r = torchrun(2, ["save", str(src), str(ckpt), "2", "1"], script="tests/dist/worker.py")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    r = torchrun(1, ["source.kind=megatron", f"source.path={ckpt}", f"source.hf_config={src}", f"output.dir={out}"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert mismatches(out, state) == []
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 1100
