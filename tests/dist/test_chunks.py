"""The in-process API with what training jobs hold: a list of virtual-pipeline model chunks per rank, MLA
down-projections replicated across tensor parallel ranks (TransformerEngine's duplicated TELinear), and pipeline
stages of unequal depth. Real gloo
groups under torchrun, byte for byte against the single-process reference."""
import json

from transformers import LlamaConfig

from helpers import RAGGED, mismatches, ragged_deepseek_v3, torchrun, write_hf_source

WORKER = "tests/dist/chunks_worker.py"


def test_virtual_pipeline_chunks(tmp_path):
    """pp 2 x 2 chunks of one layer each: stage 0 holds layers 0 and 2, stage 1 layers 1 and 3 (dense layer 0)."""
    cfg = ragged_deepseek_v3(mtp=0)
    cfg.num_hidden_layers = 4
    src, out = tmp_path / "src", tmp_path / "out"
    state = write_hf_source(src, cfg)
    r = torchrun(2, ["vpp", str(src), str(out), "1", "2", "2"], script=WORKER)
    assert r.returncode == 0 and "CHUNKS_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert mismatches(out, state) == []
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert {f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in (1, 2, 3)} <= set(index)


def test_replicated_down_projections_quantized_without_collective(tmp_path):
    """Each tp rank holds q_a_proj (96 rows) and kv_a_proj_with_mqa (192 rows) whole; tp rank 0 writes them. With
    the pieces given axis "tp" on rank 0 only, the amax all-reduce ran on one rank and gloo aborted."""
    src, out = tmp_path / "src", tmp_path / "out"
    state = write_hf_source(src, ragged_deepseek_v3(mtp=0))
    r = torchrun(2, ["replicated", str(src), str(out), "2", "1", "0"], script=WORKER)
    assert r.returncode == 0 and "CHUNKS_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert mismatches(out, state) == []


def test_pipeline_stages_of_unequal_depth(tmp_path):
    """pp 2 over 3 layers, the first stage holding 1 (``num_layers_in_first_pipeline_stage``): how a model whose
    depth pp does not divide is trained. Every layer is written once, byte for byte."""
    src, out = tmp_path / "src", tmp_path / "out"
    state = write_hf_source(src, LlamaConfig(**{**RAGGED, "num_hidden_layers": 3}))
    r = torchrun(2, ["uneven", str(src), str(out), "1", "2", "1"], script=WORKER)
    assert r.returncode == 0 and "CHUNKS_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert "rank 0 holds layers [0]" in r.stdout and "rank 1 holds layers [1, 2]" in r.stdout, r.stdout[-3000:]
    assert mismatches(out, state) == []
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert {f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)} <= set(index)
