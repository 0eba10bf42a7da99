"""quant.serve_tp through the real CLI: a loud warning when most linears stay unquantized, naming the serving TP
sizes that would keep them; the transformers target keeps what transformers' dequantize gets wrong; the in-process
API's serve_tp keeps the same layers. The module's exports run from one torchrun launch (tests/jobs.py), each in
processes of its own."""
import json

import torch
import transformers as tf

from helpers import mismatches
from jobs import Job


def _ragged_llama():
    return tf.LlamaConfig(vocab_size=1003, hidden_size=384, intermediate_size=1152, num_hidden_layers=2,
                          num_attention_heads=6, num_key_value_heads=2, head_dim=48, max_position_embeddings=256)


JOBS = {"test_serve_tp_that_quantizes_nothing_warns_and_names_the_sizes_that_would": Job(1, ["quant.serve_tp=4"]),
        "test_transformers_target_keeps_ragged_weights_unquantized": Job(
            2, ["parallel.tp=2", "quant.serve_tp=transformers"], _ragged_llama()),
        "test_api_serve_tp_keeps_what_the_cli_keeps": Job(
            2, ["parallel.tp=2", "quant.serve_tp=transformers", "output.verify=false"], _ragged_llama()),
        # the same source through the in-process API (tests/dist/worker.py builds the Megatron model, calls export)
        "test_api_serve_tp_keeps_what_the_cli_keeps::api": Job(
            2, ["api", "{src}", "{out}", "2", "1", "amax", "transformers"],
            source_from="test_api_serve_tp_keeps_what_the_cli_keeps", script="tests/dist/worker.py")}


def test_serve_tp_that_quantizes_nothing_warns_and_names_the_sizes_that_would(exported):
    assert exported.returncode == 0, exported.log()
    r, out = exported, exported.out
    assert "WARNING: quant.serve_tp=4 keeps 14 of 14 quantizable linears unquantized: the checkpoint is mostly " \
           "bfloat16, not FP8. vLLM/SGLang keep every linear quantized at tp=1 (" in r.stderr, r.stderr
    assert r.stderr.count("WARNING: quant.serve_tp") == 1
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_transformers_target_keeps_ragged_weights_unquantized(exported):
    assert exported.returncode == 0, exported.log()
    r, out, state = exported, exported.out, exported.state
    skip = set(json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"])
    for i in range(2):   # q (288 rows), k/v (96), o (288 columns) would dequantize wrong; gate/up/down are fine
        assert {f"model.layers.{i}.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")} <= skip
        assert not {f"model.layers.{i}.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")} & skip
    assert "transformers dequant OK (required)" in r.stdout
    assert "WARNING: quant.serve_tp=transformers keeps 8 of 14 quantizable linears unquantized" in r.stderr
    assert "8 of them because transformers' dequantize needs rows and columns in multiples of 128" in r.stderr
    assert mismatches(out, state) == []


def _tensors(out) -> dict:
    from safetensors import safe_open
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for name in h.keys():
                t = h.get_tensor(name)
                got[name] = (t.dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return got


def test_api_serve_tp_keeps_what_the_cli_keeps(exported, exports):
    """api.export(serve_tp=...) resolves the serving targets the way quant.serve_tp does: the same bytes."""
    assert exported.returncode == 0, exported.log()
    r = exports["test_api_serve_tp_keeps_what_the_cli_keeps::api"]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cli, api = exported.out, r.out
    qc = [json.loads((d / "config.json").read_text())["quantization_config"] for d in (cli, api)]
    assert qc[0] == qc[1] and "model.layers.0.self_attn.q_proj" in qc[0]["modules_to_not_convert"]
    assert "model.layers.0.mlp.gate_proj" not in qc[0]["modules_to_not_convert"]
    assert _tensors(cli) == _tensors(api)
