"""ExportOptions made from the config and from the API keywords agree, serve targets resolved the same way; the
older run_export keywords still give the same options."""
import pytest
import torch

from megatron_fp8pb.archs import dims_from_hf
from megatron_fp8pb.config import load_config
from megatron_fp8pb.options import ExportOptions, RankView, quant_choice, view_and_options
from megatron_fp8pb.plan import QuantChoice
from megatron_fp8pb.sources import source_config


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
    assert a.serve_targets == cfg.quant.serve_targets()


def test_api_serve_tp_as_a_number():
    _, d = _cfg_and_dims()
    assert ExportOptions.from_keywords(d, serve_tp=4) == ExportOptions.from_keywords(d, serve_tp="4")


def test_bad_serve_tp_is_refused_by_name():
    _, d = _cfg_and_dims()
    with pytest.raises(ValueError, match="quant.serve_tp"):
        ExportOptions.from_keywords(d, serve_tp="tp4")


def test_quant_config_is_the_choice():
    cfg, _ = _cfg_and_dims("quant.lm_head=true", "quant.scale_fmt=ue8m0", "quant.enabled=false")
    assert quant_choice(cfg.quant) == QuantChoice(False, (), True, "ue8m0")


def test_older_run_export_keywords():
    params = [("x", torch.zeros(1))]
    view, opts = view_and_options(params, None, dict(quant=QuantChoice(scale_fmt="ue8m0"), overwrite=True,
                                                     layer_of_local={0: 3}, num_local_experts=2))
    assert view == RankView(params, {0: 3}, 2)
    assert opts == ExportOptions(QuantChoice(scale_fmt="ue8m0"), overwrite=True)
    with pytest.raises(TypeError, match="options and the keyword"):
        view_and_options(params, opts, dict(overwrite=True))
    with pytest.raises(TypeError, match="unexpected keyword"):
        view_and_options(params, None, dict(max_shard=1))
