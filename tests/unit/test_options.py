"""ExportOptions made from the config and from the API keywords agree, serve targets resolved the same way; the
API keywords make the same QuantConfig as the config's quant section."""
import pytest
import torch

from megatron_fp8pb.archs import dims_from_hf
from megatron_fp8pb.config import load_config
from megatron_fp8pb.config import QuantConfig
from megatron_fp8pb.exporter.options import ExportOptions
from megatron_fp8pb.sources.registry import source_config


def _cfg_and_dims(*overrides):
    cfg = load_config(None, list(overrides))
    return cfg, dims_from_hf(source_config(cfg))


@pytest.mark.parametrize("serve", ["4", "transformers", "2,transformers", None])
def test_config_and_keywords_give_the_same_options(serve):
    cfg, d = _cfg_and_dims('quant.exclude=["*.mlp.*"]', "output.max_shard_size=1GB",
                           *([f"quant.serve_tp={serve}"] if serve else []))
    a = ExportOptions.from_config(cfg.quant, cfg.output, d, torch.bfloat16)
    b = ExportOptions.from_keywords(d, exclude=("*.mlp.*",), serve_tp=serve, max_shard_size="1GB",
                                    out_dtype=torch.bfloat16)
    assert a == b
    assert a.quant.exclude[0] == "*.mlp.*"
    assert (len(a.quant.exclude) > 1) == (serve not in (None, "transformers"))   # tiny: 128-multiples, refused at tp=4
    assert a.quant.serve_targets() == cfg.quant.serve_targets()


def test_api_serve_tp_as_a_number():
    _, d = _cfg_and_dims()
    assert ExportOptions.from_keywords(d, serve_tp=4) == ExportOptions.from_keywords(d, serve_tp="4")


def test_bad_serve_tp_is_refused_by_name():
    _, d = _cfg_and_dims()
    with pytest.raises(ValueError, match="quant.serve_tp"):
        ExportOptions.from_keywords(d, serve_tp="tp4")


def test_keywords_make_the_config_quant_section():
    cfg, d = _cfg_and_dims("quant.lm_head=true", "quant.scale_fmt=ue8m0", "quant.enabled=false", "quant.serve_tp=4")
    assert cfg.quant == QuantConfig(enabled=False, lm_head=True, serve_tp="4", scale_fmt="ue8m0")
    b = ExportOptions.from_keywords(d, quantize=False, quantize_lm_head=True, scale_fmt="ue8m0", serve_tp=4)
    assert b.quant == cfg.quant     # nothing quantized: no serve-target excludes
    assert QuantConfig(exclude=["*.mlp.*"]).exclude == ("*.mlp.*",)
