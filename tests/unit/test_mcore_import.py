"""mcore_import: the CLI's import of megatron-core leaves out the optional packages it reaches for features the
export does not use (its timers' loggers, Cython through torch's cpp_extension), and they import as usual after it.
Real megatron-core in a fresh interpreter; stand-in packages that record being imported. (Cython is reached only
where torch's cpp_extension imports setuptools' build_ext eagerly, as torch 2.11 does; the first test covers its
refusal on its own.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_fp8pb.parallel.megatron_import import refused

ROOT = Path(__file__).resolve().parents[2]


def _fresh(code: str, extra_path: Path) -> dict:
    """Run ``code`` in a fresh interpreter with ``extra_path`` first on sys.path; the JSON it prints last."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(extra_path), str(ROOT)]), PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture
def stand_ins(tmp_path):
    """Packages named wandb, Cython (with the modules setuptools' build_ext looks for) and tensorboard, each writing
    its name to a log when imported."""
    log = tmp_path / "imported.log"
    for name, files in {"wandb": ["__init__.py"], "tensorboard": ["__init__.py"],
                        "Cython": ["__init__.py", "Distutils/__init__.py", "Distutils/build_ext.py",
                                   "Compiler/__init__.py", "Compiler/Main.py"]}.items():
        for f in files:
            p = tmp_path / name / f
            p.parent.mkdir(parents=True, exist_ok=True)
            body = f"open({str(log)!r}, 'a').write({name + '/' + f!r} + '\\n')\n"
            if f == "Distutils/build_ext.py":
                body += "from distutils.command.build_ext import build_ext\n"
            p.write_text(body)
    return tmp_path, log


def test_refused_only_inside_and_only_what_was_not_imported(stand_ins):
    path, log = stand_ins
    out = _fresh("""
        import json, sys
        import tensorboard                       # imported before: stays
        from megatron_fp8pb.parallel.megatron_import import refused
        res = {}
        with refused(("wandb", "Cython", "tensorboard")):
            for name in ("wandb", "Cython.Distutils.build_ext", "tensorboard"):
                try:
                    __import__(name)
                    res[name] = "imported"
                except ImportError:
                    res[name] = "refused"
        import wandb, Cython.Compiler.Main         # afterwards, as usual
        res["after"] = [m in sys.modules for m in ("wandb", "Cython.Compiler.Main")]
        print(json.dumps(res))
    """, path)
    assert out == {"wandb": "refused", "Cython.Distutils.build_ext": "refused", "tensorboard": "imported",
                   "after": [True, True]}
    assert log.read_text().split() == ["tensorboard/__init__.py", "wandb/__init__.py", "Cython/__init__.py",
                                       "Cython/Compiler/__init__.py", "Cython/Compiler/Main.py"]


def test_refused_leaves_alone_a_module_put_there_meanwhile():
    """A name the block refused but someone put in sys.modules meanwhile is left alone."""
    name = "fp8pb_refused_probe"
    try:
        with refused((name,)):
            assert sys.modules[name] is None
            sys.modules[name] = sys   # e.g. a loader that registered a module under that name
        assert sys.modules[name] is sys
    finally:
        sys.modules.pop(name, None)
    with refused((name,)):
        pass
    assert name not in sys.modules


def test_megatron_core_imports_without_the_optional_packages(stand_ins):
    pytest.importorskip("megatron.core")
    path, log = stand_ins
    out = _fresh("""
        import json, sys
        from megatron_fp8pb.parallel.megatron_import import MEGATRON_MODULES, REFUSED_OPTIONAL, import_without_compiling
        import_without_compiling()
        import megatron.core.timers as timers
        res = {"imported": all(m in sys.modules for m in MEGATRON_MODULES),
               "left_out": [m for m in REFUSED_OPTIONAL if m in sys.modules],
               "timers_wandb": timers.wandb is None}
        import wandb                             # importable again
        res["wandb_after"] = "wandb" in sys.modules
        print(json.dumps(res))
    """, path)
    assert out["imported"] and out["left_out"] == [] and out["timers_wandb"] and out["wandb_after"]
    # only the import made after the block ran the stand-in
    assert log.read_text().split() == ["wandb/__init__.py"]

