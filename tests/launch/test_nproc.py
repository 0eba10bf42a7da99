"""launch/nproc.py: the processes per node a layout needs, from the config and its '# nodes:' header."""
import importlib.util
from pathlib import Path

import pytest

from megatron_fp8pb import launcher

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("nproc", ROOT / "launch" / "nproc.py")
nproc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nproc)


@pytest.mark.parametrize("layout,world", [((2, 1, 1, None), 2), ((8, 2, 1, None), 16), ((2, 1, 4, 1), 4),
                                          ((4, 2, 8, 1), 16), ((1, 1, 4, 2), 8), ((2, 3, 1, None), 6)])
def test_min_world(layout, world):
    assert launcher.min_world(*layout) == world


def test_per_node_keeps_the_header_world_while_the_layout_divides_it():
    assert nproc.per_node(4, 1, 1, 8) == 8          # tp=2 ep=4 on the 8 GPUs the file names: dp=4
    assert nproc.per_node(16, 2, 2, 8) == 8
    assert nproc.per_node(16, 4, 2, 8) == 4         # same world, more nodes
    assert nproc.per_node(3, 1, 1, 8) == 3          # an override no longer fits the header: the layout's own
    assert nproc.per_node(2, 1) == 2


def test_per_node_names_the_fix():
    with pytest.raises(ValueError, match=r"world size 6 .* % nodes\(4\) = 2 != 0.*FP8PB_NPROC_PER_NODE"):
        nproc.per_node(6, 4)


def test_main_reads_config_and_overrides(capsys):
    cfg = str(ROOT / "configs" / "qwen3-30b-a3b-tp2-ep4.yaml")
    assert nproc.main(["--config", cfg]) == 0
    assert capsys.readouterr().out.strip() == "8"
    assert nproc.main(["--config", cfg, "--nodes", "2"]) == 0
    assert capsys.readouterr().out.strip() == "4"
    assert nproc.main(["parallel.tp=2", "parallel.pp=2"]) == 0
    assert capsys.readouterr().out.strip() == "4"
    assert nproc.main(["--nodes", "3", "parallel.tp=2"]) == 2
    assert "% nodes(3)" in capsys.readouterr().err


def test_an_override_of_the_layout_drops_the_files_gpu_count(capsys):
    cfg = str(ROOT / "configs" / "llama3-8b-tp8.yaml")          # gpus_per_node: 8, tp=8
    assert nproc.main(["--config", cfg]) == 0
    assert capsys.readouterr().out.strip() == "8"
    assert nproc.main(["--config", cfg, "parallel.tp=2"]) == 0
    assert capsys.readouterr().out.strip() == "2"
    cfg = str(ROOT / "configs" / "qwen3-30b-a3b-tp2-ep4.yaml")  # 8 GPUs, dp=4 while the layout is the file's
    assert nproc.main(["--config", cfg, "output.dir=/tmp/x"]) == 0
    assert capsys.readouterr().out.strip() == "8"
    assert nproc.main(["--config", cfg, "parallel.ep=2"]) == 0
    assert capsys.readouterr().out.strip() == "2"
