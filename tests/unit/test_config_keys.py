"""The config keys as --help lists them, quant.serve_tp targets, and config files that cannot be read."""
import dataclasses

import pytest

from megatron_fp8pb.config import ExportConfig, describe_keys, keys_help, load_config, serve_targets


def _leaf_keys(obj, prefix=""):
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        yield from _leaf_keys(v, f"{prefix}{f.name}.") if dataclasses.is_dataclass(v) else [f"{prefix}{f.name}"]


def test_every_key_is_described_with_its_default_and_a_meaning():
    rows = describe_keys()
    assert [k for k, _, _ in rows] == list(_leaf_keys(ExportConfig()))
    assert all(meaning for _, _, meaning in rows)
    shown = {k: d for k, d, _ in rows}
    assert shown["parallel.tp"] == "1" and shown["quant.serve_tp"] == "none" and shown["quant.exclude"] == "[]"
    assert shown["output.dir"] == "out/tiny-qwen3-fp8" and shown["output.overwrite"] == "false"
    assert "(one of auto, cpu, cuda)" in dict((k, m) for k, _, m in rows)["parallel.device"] or \
        "auto | cpu | cuda" in dict((k, m) for k, _, m in rows)["parallel.device"]
    assert len(keys_help().splitlines()) == len(rows)


def test_serve_targets():
    assert serve_targets(None) == ((), False)
    assert serve_targets("4") == ((4,), False)
    assert serve_targets("transformers") == ((), True)
    assert serve_targets("2, 8,transformers") == ((2, 8), True)
    assert load_config(None, ["quant.serve_tp=4"]).quant.serve_tp == "4"
    with pytest.raises(ValueError, match=r"quant.serve_tp='vllm': 'vllm' is neither a TP size"):
        load_config(None, ["quant.serve_tp=vllm"])


def test_unreadable_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("parallel:\n  tp: [1\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_config(str(bad))
