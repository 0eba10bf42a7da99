"""Fixtures of the verify tests: a tiny qwen3 source with its good FP8 output, and a copy of it to corrupt."""
import shutil
from pathlib import Path

import pytest

from fp8_checkpoints import tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(source dir, good output dir, source state) of a tiny qwen3."""
    _, state, src, out = tiny_checkpoint(tmp_path_factory.mktemp("verify"))
    return src, out, state


@pytest.fixture
def bad(tiny, tmp_path) -> Path:
    """A copy of the good output to corrupt."""
    return Path(shutil.copytree(tiny[1], tmp_path / "bad"))
