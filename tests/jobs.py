"""Command-line exports of one test module, run together: one torchrun launch (world size the largest job's) runs
every job in turn, each in processes of its own forked from the launch's, as many as the job's world size, which
start their own gloo process group as launch/export.py does (tests/dist/jobs_worker.py). Starting Python, torch and
transformers once per module instead of once per export was most of the time these tests took.

A module lists its jobs by test name (``request.node.name``); its module-scoped fixture calls ``run_jobs`` for the
ones the session selected, and each test looks up its own ``Exported`` (exit code, output, per-job stdout/stderr), so
a failure names its case. A job that refuses, fails or is killed has its exit code and output like any other; a
launch that dies leaves the jobs after it without one, and their tests say so."""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from helpers import torchrun, write_hf_source

CLI = "launch/export.py"


@dataclass
class Job:
    """What ``torchrun --nproc_per_node=world SCRIPT ARGS`` runs: ``script`` (default the command line,
    launch/export.py) with ``args``, extra environment ``env``. With ``cfg``, an HF config, a seeded bf16 HF source is
    written first (``edit(src)`` may change it then); ``source_from``: the key of an earlier job whose source this
    one reads instead. ``{src}`` and ``{out}`` in ``args`` stand for the source and the job's output directory; the
    command line gets ``output.dir={out}`` (and source.kind/source.path with a source) before ``args``, which may
    override them."""
    world: int
    args: list[str]
    cfg: object = None
    seed: int = 0
    env: dict = field(default_factory=dict)
    edit: Callable[[Path], None] | None = None
    source_from: str | None = None
    script: str = CLI


@dataclass
class Exported:
    """What a job left: ``returncode`` (None when its launch ended before it), the ranks' stdout and stderr joined
    in rank order, its source (``src``, ``state``: the source's tensors) and output directory."""
    returncode: int | None
    stdout: str
    stderr: str
    src: Path | None
    out: Path
    state: dict[str, torch.Tensor] | None
    seconds: float

    def log(self, n: int = 3000) -> str:
        """The last ``n`` characters of its stdout and of its stderr (an assertion's message)."""
        return self.stdout[-n:] + self.stderr[-n:]


def selected_jobs(request, jobs: dict[str, Job]) -> dict[str, Job]:
    """The jobs of the tests selected in this session from the requesting module: a job's key is its test's name
    (``request.node.name``), or that name, ``::`` and a name of its own for a test's further jobs. Every test that
    uses the module's jobs fixture must have one."""
    names = {item.name for item in request.session.items
             if item.module is request.module and request.fixturename in item.fixturenames}
    unknown = sorted(names - {k.split("::")[0] for k in jobs})
    assert not unknown, f"tests using {request.fixturename} without a job: {unknown}"
    return {k: j for k, j in jobs.items() if k.split("::")[0] in names}


def run_jobs(root: Path, jobs: dict[str, Job], timeout: int = 900) -> dict[str, Exported]:
    """Write the jobs' sources under ``root``, run every job in one torchrun launch (in the order given), and collect
    each job's result."""
    order = list(jobs)
    spec, made = [], {}
    for n, key in enumerate(order):
        job, d = jobs[key], root / f"job{n}"
        d.mkdir(parents=True)
        src = state = None
        if job.cfg is not None:
            src = d / "src"
            state = write_hf_source(src, job.cfg, seed=job.seed)
            if job.edit:
                job.edit(src)
        elif job.source_from:
            _, src, state = made[job.source_from]
        argv = job.args
        if job.script == CLI:
            argv = [*(["source.kind=hf", f"source.path={src}"] if src else []), "output.dir={out}", *argv]
        argv = [a.replace("{src}", str(src)).replace("{out}", str(d / "out")) for a in argv]
        made[key] = (d, src, state)
        spec.append({"key": key, "world": job.world, "script": job.script, "argv": argv, "dir": str(d),
                     "env": job.env})
    (root / "jobs.json").write_text(json.dumps(spec, indent=1))
    world = max(j.world for j in jobs.values()) if jobs else 0
    launch = ""
    if jobs:
        try:
            r = torchrun(world, [str(root / "jobs.json")], script="tests/dist/jobs_worker.py", timeout=timeout)
            launch = f"rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
        except subprocess.TimeoutExpired as e:
            launch = f"timed out after {timeout} s\n{e.stderr[-4000:] if e.stderr else ''}"
    results = {}
    for key in order:
        d, src, state = made[key]
        codes, seconds = [], 0.0
        for rank in range(jobs[key].world):
            f = d / f"rank{rank}.json"
            if f.exists():
                rec = json.loads(f.read_text())
                codes.append(rec["returncode"])
                seconds = max(seconds, rec["seconds"])
            else:
                codes.append(None)
        out = "".join(_read(d / f"rank{r}.stdout") for r in range(jobs[key].world))
        err = "".join(_read(d / f"rank{r}.stderr") for r in range(jobs[key].world))
        if None in codes:
            rc = None
            err += f"\n[jobs] no exit code from rank(s) {[r for r, c in enumerate(codes) if c is None]}: the " \
                   f"launch of {root / 'jobs.json'} ended first: {launch}"
        else:
            rc = next((c for c in codes if c), 0)
        results[key] = Exported(rc, out, err, src, d / "out", state, seconds)
    return results


def _read(p: Path) -> str:
    return p.read_text(errors="replace") if p.exists() else ""
