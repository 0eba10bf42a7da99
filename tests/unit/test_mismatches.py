"""The byte-equality helper of the export tests fails outputs that hold the wrong kind of tensor, not only wrong
bytes: an unquantized linear where FP8 is expected, FP8 where the source dtype is expected, a stray scale."""
from __future__ import annotations

import torch

from helpers import mismatches
from megatron_fp8pb.output.hf_files import config_json, quantization_config
from megatron_fp8pb.output.writer import CheckpointWriter, TensorSpec
from megatron_fp8pb.sources.tiny import tiny_hf_config

from fp8_checkpoints import NOT_CONVERTED, Q, output_tensors


def _write(path, tensors: dict[str, torch.Tensor], not_converted: list[str] | None):
    """An output holding exactly ``tensors``; config.json lists ``not_converted`` (None: no quantization_config)."""
    cfg = tiny_hf_config("qwen3")
    w = CheckpointWriter(path, [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()],
                         max_shard_size="1MB")
    for n, t in tensors.items():
        w.write(n, t)
    qc = None if not_converted is None else quantization_config(not_converted, True)
    return w.finish({"config.json": config_json(cfg, cfg.vocab_size, False, torch.bfloat16, qc)})


def test_a_good_output_has_no_mismatch(tiny):
    _, out, state = tiny
    assert mismatches(out, state) == []


def test_an_unquantized_linear_where_fp8_is_expected_fails(tiny, tmp_path):
    state = tiny[2]
    tensors = output_tensors(state)
    tensors[Q] = state[Q]                       # the source bf16 tensor, byte for byte, and no scale
    del tensors[Q + "_scale_inv"]
    bad = mismatches(_write(tmp_path / "o", tensors, NOT_CONVERTED), state)
    assert bad == [f"{Q} (torch.bfloat16, expected torch.float8_e4m3fn)"]


def test_fp8_where_the_source_dtype_is_expected_fails(tiny, tmp_path):
    state = tiny[2]
    module = Q.removesuffix(".weight")          # listed as not converted, yet written FP8
    bad = mismatches(_write(tmp_path / "o", output_tensors(state), NOT_CONVERTED + [module]), state)
    assert bad == [f"{Q} (torch.float8_e4m3fn, expected torch.bfloat16)"]


def test_a_stray_scale_fails(tiny, tmp_path):
    state = tiny[2]
    tensors = output_tensors(state)
    tensors[Q] = state[Q]                       # unquantized and listed, but its scale is left behind
    bad = mismatches(_write(tmp_path / "o", tensors, NOT_CONVERTED + [Q.removesuffix(".weight")]), state)
    assert bad == [f"{Q}_scale_inv (a scale of a weight that is not fp8)"]


def test_quantized_flag_says_which_kind_of_export_is_expected(tiny, tmp_path):
    _, out, state = tiny
    plain = _write(tmp_path / "plain", dict(state), None)
    assert mismatches(plain, state, quantized=False) == []
    assert mismatches(plain, state)                 # expected FP8 linears, found none
    bad = mismatches(out, state, quantized=False)   # expected none, found 14
    assert sum("expected torch.bfloat16" in b for b in bad) == 14 and "quantization_config" in bad[0]


def test_a_flipped_fp8_byte_and_a_recast_tensor_fail(tiny, tmp_path):
    state = tiny[2]
    tensors = output_tensors(state)
    raw = tensors[Q].view(torch.uint8).clone()
    raw.view(-1)[0] ^= 0x01
    tensors[Q] = raw.view(torch.float8_e4m3fn)
    norm = "model.norm.weight"
    tensors[norm] = state[norm].float()             # the same values in another dtype
    assert sorted(mismatches(_write(tmp_path / "o", tensors, NOT_CONVERTED), state)) == sorted([Q, norm])
