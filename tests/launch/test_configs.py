"""Every shipped config loads and its layout is accepted for its architecture on the nodes x GPUs it names."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_fp8pb.archs import dims_from_hf
from megatron_fp8pb.config import load_config
from megatron_fp8pb.presets import preset_hf_config
from megatron_fp8pb.tiny import tiny_hf_config
from megatron_fp8pb.validate import check_layout

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _header(path: Path, key: str) -> str:
    m = re.search(rf"^#\s*{key}:\s*(\S+)\s*$", path.read_text(), re.MULTILINE)
    assert m, f"{path.name} lacks a '# {key}:' line"
    return m.group(1)


def test_configs_exist():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_layout_is_valid(path):
    cfg = load_config(str(path))
    preset = _header(path, "preset")
    hf = tiny_hf_config(preset.split("-", 1)[1]) if preset.startswith("tiny-") else preset_hf_config(preset)
    world = int(_header(path, "nodes")) * int(_header(path, "gpus_per_node"))
    p = cfg.parallel
    dp = check_layout(dims_from_hf(hf), world, p.tp, p.pp, p.ep, p.etp)
    assert dp >= 1
    per_node = subprocess.run([sys.executable, str(ROOT / "launch" / "nproc.py"), "--config", str(path)],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert int(per_node) == int(_header(path, "gpus_per_node"))


def test_a_bad_layout_is_refused():
    with pytest.raises(ValueError, match=r"num_key_value_heads\(8\) % tp\(16\)"):
        check_layout(dims_from_hf(preset_hf_config("llama3-70b")), 16, 16, 1)
