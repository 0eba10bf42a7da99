"""Installing into an environment that already has torch and megatron-core (an NGC PyTorch container): pip keeps
its torch, also a pre-release build like NGC's; a torch outside the supported range would be replaced, which is
why the README says to check with --dry-run first."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _would_install(tmp_path: Path, torch_version: str) -> dict[str, str]:
    """What ``pip install --dry-run -e .`` would install into this environment with ``torch_version`` installed
    (a distribution record placed first on the path; pip reads installed versions from there)."""
    site = tmp_path / "site"
    info = site / f"torch-{torch_version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {torch_version}\n")
    (info / "RECORD").write_text("")
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-build-isolation", "--no-index",
                        "--quiet", "--report", str(report), "-e", str(ROOT)],
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                       timeout=300)
    if r.returncode:     # pip found nothing it could install: name what it looked for
        return {"(unresolved)": r.stderr}
    return {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}


@pytest.mark.parametrize("torch_version", ["2.8.0a0+5228986c39.nv25.6", "2.13.0"])
def test_editable_install_keeps_the_environments_torch(tmp_path, torch_version):
    assert _would_install(tmp_path, torch_version) == {"megatron-fp8pb": "0.1.0"}


def test_a_torch_outside_the_range_would_be_replaced(tmp_path):
    got = _would_install(tmp_path, "2.5.0")
    assert "torch" in got or "torch" in got.get("(unresolved)", "")   # a wheel to replace it with, or a search
