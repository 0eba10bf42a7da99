"""The file layout of the source does not change the export: the same model saved the way save_pretrained saves it
(shards cut in module order, each file's tensors sorted by name, so ``layers.10`` precedes ``layers.2``), saved in
the order the export reads it, and saved in many small shards, exported through the command line at tp=2 on gloo,
give byte-identical files, each tensor the single-process reference's."""
import transformers as tf

from megatron_fp8pb.cli import RESOLVED_CONFIG

from helpers import RAGGED, mismatches, rewrite_as_save_pretrained, rewrite_in_export_order
from jobs import Job


def _llama():
    return tf.LlamaConfig(**{**RAGGED, "num_hidden_layers": 12})


ARGS = ["parallel.tp=2", "output.max_shard_size=4MB"]
LAYOUTS = {
    "save_pretrained": lambda src: rewrite_as_save_pretrained(src, _llama(), 8 << 20),
    "many_shards": lambda src: rewrite_as_save_pretrained(src, _llama(), 1 << 20),
    "export_ordered": lambda src: rewrite_in_export_order(src, _llama(), 8 << 20),
}
JOBS = {f"test_layouts_export_the_same_bytes::{name}": Job(2, ARGS, _llama(), seed=7, edit=edit)
        for name, edit in LAYOUTS.items()}


def test_layouts_export_the_same_bytes(exports):
    runs = {key.split("::")[1]: r for key, r in exports.items()}
    assert set(runs) == set(LAYOUTS)
    for name, r in runs.items():
        assert r.returncode == 0, f"{name}: {r.log()}"
        assert len(list(r.src.glob("*.safetensors"))) >= 3, name
    ref = runs["export_ordered"]
    assert mismatches(ref.out, ref.state) == []
    files = sorted(p.name for p in ref.out.iterdir())
    assert any(f.endswith(".safetensors") for f in files) and "model.safetensors.index.json" in files
    for name, r in runs.items():
        assert sorted(p.name for p in r.out.iterdir()) == files, name
        for f in files:
            if f == RESOLVED_CONFIG:    # records the source's path
                continue
            assert (r.out / f).read_bytes() == (ref.out / f).read_bytes(), f"{name}: {f} differs"
