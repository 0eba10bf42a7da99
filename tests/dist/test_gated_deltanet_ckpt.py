"""A Megatron distributed checkpoint of Qwen3-Next and Qwen3.5-MoE (megatron-core's GatedDeltaNet linear attention beside gated full
attention, MoE with a gated shared expert) saved at one layout and exported at another through the real CLI: every
tensor byte for byte the single-process reference of the HF weights it was saved from, and the same files as
megatron-core's own load of the whole model at the export layout. megatron-core builds GatedDeltaNet only where
flash-linear-attention imports: without it the module is skipped, and the refusal names that and the fix."""
import pytest

from helpers import torchrun, write_hf_source
from test_dist_ckpt_stream import _check_resharded, _save

from megatron_fp8pb.parallel.gdn_local import fla_missing

MISSING = fla_missing()
needs_fla = pytest.mark.skipif(MISSING is not None, reason=f"megatron-core cannot build GatedDeltaNet: {MISSING}")


@needs_fla
@pytest.mark.parametrize("family,save,export", [("qwen3_next", (2, 1, 1), (1, 2, 1)),
                                                ("qwen3_next", (1, 1, 2), (2, 1, 1)),
                                                ("qwen3_5_moe_text", (2, 1, 1), (1, 1, 2))],
                         ids=["qwen3_next_tp2_to_pp2", "qwen3_next_ep2_to_tp2", "qwen3_5_moe_tp2_to_ep2"])
def test_gated_deltanet_resharded(tmp_path, family, save, export):
    """Qwen3-Next saved at tp=2 (each rank one key head of in_proj's six parts) exported at pp=2, and saved at ep=2
    exported at tp=2; Qwen3.5-MoE (in_proj split four ways in HF) saved at tp=2 exported at ep=2. ``A_log`` is float32 in HF and params_dtype (bf16) in the Megatron model: the checkpoint holds its bf16
    rounding, which the export writes back as float32."""
    import torch
    from megatron_fp8pb.sources.tiny import tiny_hf_config
    src, ckpt, state = _save(tmp_path, tiny_hf_config(family), 2, *save)
    assert any(n.endswith(".A_log") and t.dtype == torch.float32 for n, t in state.items())
    state = {n: t.to(torch.bfloat16).float() if n.endswith(".A_log") else t for n, t in state.items()}
    _check_resharded(tmp_path, src, ckpt, state, export)


@pytest.mark.skipif(MISSING is None, reason="flash-linear-attention imports here: the refusal is not reached")
def test_refusal_names_flash_linear_attention(tmp_path):
    from megatron_fp8pb.sources.tiny import tiny_hf_config
    src = tmp_path / "src"
    write_hf_source(src, tiny_hf_config("qwen3_next"))
    (tmp_path / "ckpt").mkdir()
    r = torchrun(1, ["source.kind=megatron", f"source.path={tmp_path / 'ckpt'}", f"source.hf_config={src}/config.json",
                     f"output.dir={tmp_path / 'out'}"])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode != 0 and len(errors) == 1, r.stderr[-3000:]
    assert "flash-linear-attention" in errors[0] and "source.kind=hf" in errors[0], errors[0]
