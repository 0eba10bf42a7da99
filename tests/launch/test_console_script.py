"""megatron-fp8pb-export as a user runs it: it starts its own ranks, ends a refusal with one line and exit code 2,
Ctrl-C with one line and nothing written, and its ranks stop when it is killed. Real processes, real gloo groups."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_fp8pb.archs import presets, registry, tiny_names
from megatron_fp8pb.sources.kinds import KINDS

ROOT = Path(__file__).resolve().parents[2]
CMD = [sys.executable, "-m", "megatron_fp8pb.launcher"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK")}
    return dict(env, PYTHONPATH=str(ROOT), **extra)


def _start(args, out_log: Path, **env):
    return subprocess.Popen(CMD + args, cwd=ROOT, env=_env(**env), stdout=open(out_log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for(log: Path, text: str, timeout: float = 240.0) -> None:
    t0 = time.monotonic()
    while text not in log.read_text():
        assert time.monotonic() - t0 < timeout, log.read_text()[-2000:]
        time.sleep(0.5)


def _ranks_of(out: Path) -> list[int]:
    r = subprocess.run(["pgrep", "-f", f"output.dir={out}"], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


def test_help_lists_every_kind_architecture_and_preset():
    r = subprocess.run(CMD + ["--help"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    names = list(KINDS) + list(tiny_names()) + list(presets()) + list(registry())
    missing = [n for n in names if n not in r.stdout]
    assert not missing and "--nproc-per-node" in r.stdout


def test_refusal_is_one_line_and_exit_code_2(tmp_path):
    r = subprocess.run(CMD + ["--nproc-per-node", "2", "parallel.tp=3", f"output.dir={tmp_path / 'out'}"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 2
    assert [line for line in r.stderr.splitlines() if line.strip()] == \
        [line for line in r.stderr.splitlines() if line.startswith("error: impossible parallel layout")]
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "out").exists()


def test_export_writes_the_resolved_config_and_reaches_100_percent(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(CMD + ["parallel.tp=2", "parallel.backend=gloo", "parallel.device=cpu", f"output.dir={out}"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    import json
    assert json.loads((out / "fp8pb_export_config.json").read_text())["parallel"]["tp"] == 2
    assert "resolved config" not in r.stdout
    progress = [line for line in r.stdout.splitlines() if "% | quantized" in line]
    assert progress and progress[-1].split("%")[0].strip().endswith("100")


@pytest.mark.parametrize("how", ["ctrl-c", "kill -9"])
def test_interrupted_or_killed_writes_nothing_and_leaves_no_rank(tmp_path, how):
    out, log = tmp_path / "out", tmp_path / "log"
    p = _start(["parallel.tp=2", "parallel.backend=gloo", "parallel.device=cpu", f"output.dir={out}"], log,
               FP8PB_INJECT_FAULT="0:write:hang")
    _wait_for(log, "quantized")
    time.sleep(1.0)
    if how == "ctrl-c":
        os.killpg(p.pid, signal.SIGINT)
        assert p.wait(timeout=60) == 130
        text = log.read_text()
        assert text.count("interrupted while exporting; nothing was written") == 1 and "Traceback" not in text
    else:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    t0 = time.monotonic()
    while _ranks_of(out) and time.monotonic() - t0 < 15:
        time.sleep(0.5)
    assert _ranks_of(out) == []
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_a_rank_starts_reading_the_source_before_it_imports_torch(tmp_path):
    """The launcher and each rank parse the command line and start the source's readahead torch-free, so the disk
    reads the source while torch imports (the full --help, which lists the architectures, is built only on -h)."""
    import json
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3", "num_hidden_layers": 2}))
    import torch
    from safetensors.torch import save_file
    save_file({"model.norm.weight": torch.ones(8)}, str(src / "model.safetensors"))
    # a rank's own path through main(), with the job itself replaced by a line that tells what was imported
    code = ("import sys, types\n"
            "job = types.ModuleType('megatron_fp8pb.cli')\n"
            "job.run = None\n"
            "sys.modules['megatron_fp8pb.cli'] = job\n"
            "from megatron_fp8pb import launcher, process\n"
            "from megatron_fp8pb.sources import readahead\n"
            "process.cli = lambda run, config, overrides: print('READAHEAD', bool(readahead._ACTIVE), 'TORCH', "
            "'torch' in sys.modules) or 0\n"
            f"sys.exit(launcher.main(['source.kind=hf', 'source.path={src}']))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=_env(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500"))
    assert "READAHEAD True TORCH False" in r.stdout, r.stdout + r.stderr
