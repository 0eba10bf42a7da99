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


def test_choices_are_checked_wherever_the_config_is_built():
    from megatron_fp8pb.config import ParallelConfig, QuantConfig
    with pytest.raises(ValueError, match=r"config key parallel.backend='mpi': choose one of auto, gloo, nccl"):
        load_config(None, ["parallel.backend=mpi"])
    with pytest.raises(ValueError, match=r"config key quant.scale_fmt='e8m0': choose one of amax, ue8m0"):
        QuantConfig(scale_fmt="e8m0")
    with pytest.raises(ValueError, match=r"parallel.tp=0 must be >= 1; parallel.etp=-1 must be >= 1"):
        ParallelConfig(tp=0, etp=-1)
    with pytest.raises(ValueError, match=r"output.max_shard_size='lots' is not a size"):
        load_config(None, ["output.max_shard_size=lots"])


def test_resolved_parallel_decides_auto_once():
    from megatron_fp8pb.config import ParallelConfig
    r = ParallelConfig(tp=2).resolved(cuda_available=False)
    assert (r.etp, r.backend, r.on_gpu, r.device) == (2, "gloo", False, "cpu")
    r = ParallelConfig(tp=2, etp=1).resolved(cuda_available=True)
    assert (r.etp, r.backend, r.on_gpu, r.device) == (1, "nccl", True, "cuda")
    r = ParallelConfig(device="cpu", backend="auto").resolved(cuda_available=True)
    assert (r.backend, r.device) == ("gloo", "cpu")
