"""Every shipped config loads, and its layout is accepted for its architecture on the nodes x GPUs it names.

A config of a real model (``source.kind: hf``) names its architecture by a ``# preset:`` comment, a key of
megatron_fp8pb/sources/presets.py; one of the embedded tiny model is checked against that model's own config."""
import importlib.util
import re
from pathlib import Path

import pytest

from megatron_fp8pb.archs import dims_from_hf
from megatron_fp8pb.config import load_config
from megatron_fp8pb.sources.presets import PRESETS, preset_hf_config
from megatron_fp8pb.sources.registry import source_config
from megatron_fp8pb.plan.validate import check_layout

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
_spec = importlib.util.spec_from_file_location("nproc", ROOT / "launch" / "nproc.py")
nproc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nproc)


def _header(path: Path, key: str) -> str:
    m = re.search(rf"^#\s*{key}:\s*(.+?)\s*$", path.read_text(), re.MULTILINE)
    assert m, f"{path.name} lacks a '# {key}: ...' comment line"
    return m.group(1)


def _hf_config(path: Path, cfg):
    if cfg.source.kind == "tiny":
        return source_config(cfg)
    assert cfg.source.kind == "hf" and cfg.source.path, f"{path.name}: a real model's config reads an HF checkpoint"
    preset = _header(path, "preset")
    assert preset in PRESETS, f"{path.name}: '# preset: {preset}' is not one of {sorted(PRESETS)}"
    return preset_hf_config(preset)


def test_the_real_models_are_shipped():
    names = {p.stem for p in CONFIGS}
    assert {"tiny-qwen3-tp2", "llama3-8b-tp8", "llama3-70b-tp8-pp2", "qwen3-30b-a3b-tp2-ep4",
            "qwen3-235b-a22b-tp4-ep8-pp2"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_layout_is_accepted(path):
    cfg = load_config(str(path))
    d = dims_from_hf(_hf_config(path, cfg))
    nodes, gpus = int(_header(path, "nodes")), int(_header(path, "gpus_per_node"))
    p = cfg.parallel
    dp = check_layout(d, nodes * gpus, p.tp, p.pp, p.ep, p.etp)
    assert dp * p.tp * p.pp == nodes * gpus


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_launch_script_processes_match_the_header(path, capsys):
    assert nproc.main(["--config", str(path)]) == 0
    assert int(capsys.readouterr().out) == int(_header(path, "gpus_per_node"))
    launch = _header(path, "launch")
    assert f"--config configs/{path.name}" in launch
    if launch.startswith("sbatch"):
        assert f"--nodes={_header(path, 'nodes')} --gpus-per-node={_header(path, 'gpus_per_node')}" in launch


def test_a_bad_layout_is_refused():
    with pytest.raises(ValueError, match=r"num_key_value_heads\(8\) % tp\(16\)"):
        check_layout(dims_from_hf(preset_hf_config("llama3-70b")), 16, 16, 1)
