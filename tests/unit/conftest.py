"""Fixtures of the verify tests: a tiny qwen3 source with its good FP8 output, and a copy of it to corrupt."""
import shutil
from pathlib import Path

import pytest

from fp8_checkpoints import write_output, write_source
from megatron_fp8pb.tiny import random_hf_state, tiny_hf_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(source dir, good output dir, source state) of a tiny qwen3."""
    root = tmp_path_factory.mktemp("verify")
    cfg = tiny_hf_config("qwen3")
    state = random_hf_state(cfg)
    src = write_source(cfg, state, root / "src")
    out = write_output(cfg, state, root / "out")
    return src, out, state


@pytest.fixture
def bad(tiny, tmp_path) -> Path:
    """A copy of the good output to corrupt."""
    return Path(shutil.copytree(tiny[1], tmp_path / "bad"))
