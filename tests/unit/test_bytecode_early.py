"""bytecode_early: helper processes compile a package's modules into a private prefix that the import then uses, only
where the installation has no bytecode (and would not write it), and cores are spare; the prefix is restored, the
helpers stopped and the directory removed."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
from importlib.machinery import SourceFileLoader

import pytest

from megatron_fp8pb import bytecode_early as be


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package of modules (one that does not compile) on sys.path; megatron-core taken to have no bytecode and not
    to write it; 3 cores, so one helper compiles every file."""
    root = tmp_path / "fp8pb_bc_pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("X = 1\n")
    (root / "sub" / "__init__.py").write_text("")
    (root / "sub" / "broken.py").write_text("def f(:\n")
    (root / "sub" / "mod.py").write_text("def f():\n    return 42\n")
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(be, "has_bytecode", lambda dotted="megatron.core": False)
    monkeypatch.setattr(be, "bytecode_will_be_written", lambda dotted="megatron.core": False)
    monkeypatch.setattr(be, "usable_cpus", lambda: 3)
    for var in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(var, raising=False)
    yield root
    be.cleanup()
    for name in [m for m in sys.modules if m.startswith("fp8pb_bc_pkg")]:
        del sys.modules[name]


def test_the_import_loads_the_helpers_bytecode_without_compiling(package, monkeypatch):
    assert be.start(("fp8pb_bc_pkg",), min_cpus=3) and len(be._state["procs"]) == 1
    prefix, before = be._state["dir"], sys.pycache_prefix
    for proc in be._state["procs"]:     # a loaded machine may take longer than the import would wait
        assert proc.wait(60) == 0
    compiled_from_source = []
    real = SourceFileLoader.source_to_code
    monkeypatch.setattr(SourceFileLoader, "source_to_code",
                        lambda self, data, path, **kw: compiled_from_source.append(path) or real(self, data, path, **kw))
    with be.used():
        assert sys.pycache_prefix == prefix
        compiled = importlib.util.cache_from_source(str(package / "sub" / "mod.py"))
        assert compiled.startswith(prefix) and os.path.exists(compiled)     # after the file that does not compile
        assert not os.path.exists(importlib.util.cache_from_source(str(package / "tests" / "test_x.py")))
        mod = importlib.import_module("fp8pb_bc_pkg.sub.mod")
        assert mod.f() == 42 and mod.__cached__ == compiled
    assert compiled_from_source == []
    assert sys.pycache_prefix == before
    assert not (package / "sub" / "__pycache__").exists()       # nothing next to the installed sources
    assert not os.path.exists(prefix) and be._state == {}       # cleaned up once imported


def test_cleanup_stops_running_helpers_and_removes_their_directory(package):
    assert be.start(("fp8pb_bc_pkg",), min_cpus=3)
    procs, prefix = list(be._state["procs"]), be._state["dir"]
    be.cleanup()
    assert all(p.poll() is not None for p in procs) and not os.path.exists(prefix)


def test_a_directory_whose_job_has_ended_is_swept(package):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = be._host_tag()
    stale = tempfile.mkdtemp(prefix=f"{be.DIR_PREFIX}{tag}-{dead.pid}-")
    kept = [tempfile.mkdtemp(prefix=f"{be.DIR_PREFIX}{tag}-{os.getpid()}-"),     # a running job's
            tempfile.mkdtemp(prefix=f"{be.DIR_PREFIX}0another-{dead.pid}-"),      # another host's: its pids mean
            tempfile.mkdtemp(prefix=f"{be.DIR_PREFIX}{tag}-x{dead.pid}-")]        # nothing here; not a pid
    try:
        assert be.start(("fp8pb_bc_pkg",), min_cpus=3)
        assert not os.path.exists(stale) and all(os.path.exists(d) for d in kept)
    finally:
        for d in kept:
            os.rmdir(d)


def test_nothing_starts_where_bytecode_exists_or_would_be_written_or_cores_are_few(package, monkeypatch):
    monkeypatch.setattr(be, "has_bytecode", lambda dotted="megatron.core": True)
    assert not be.start(("fp8pb_bc_pkg",))
    monkeypatch.setattr(be, "has_bytecode", lambda dotted="megatron.core": None)     # no megatron-core at all
    assert not be.start(("fp8pb_bc_pkg",))
    monkeypatch.setattr(be, "has_bytecode", lambda dotted="megatron.core": False)
    monkeypatch.setattr(be, "bytecode_will_be_written", lambda dotted="megatron.core": True)
    assert not be.start(("fp8pb_bc_pkg",))
    monkeypatch.setattr(be, "bytecode_will_be_written", lambda dotted="megatron.core": False)
    assert not be.start(("fp8pb_bc_pkg",))      # 3 cores: fewer than MIN_CPUS
    monkeypatch.setattr(be, "usable_cpus", lambda: 16)
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8(x2)")     # two cores per rank
    assert be.local_ranks() == 8 and not be.start(("fp8pb_bc_pkg",))
    assert be._state == {}
    with be.used():         # without helpers: the import is left as it is
        assert sys.pycache_prefix is None or be.DIR_PREFIX not in sys.pycache_prefix


def test_bytecode_is_written_by_the_import_only_where_allowed(monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    assert not be.bytecode_will_be_written("torch")
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    torch_cache = os.path.dirname(importlib.util.cache_from_source(os.path.join(be.package_root("torch"), "x.py")))
    assert be.bytecode_will_be_written("torch") == os.access(torch_cache if os.path.exists(torch_cache)
                                                             else os.path.dirname(torch_cache), os.W_OK)


def test_only_a_job_that_imports_megatron_core_starts_helpers(monkeypatch):
    asked = []
    monkeypatch.setattr(be, "start", lambda: asked.append(1) or True)
    assert not be.start_for_command_line(None, ["source.kind=hf", "source.path=/nowhere"])
    assert not be.start_for_command_line(None, ["source.kind=tiny"])
    assert not be.start_for_command_line(None, ["no_such.key=1"])
    assert asked == []
    assert be.start_for_command_line(None, ["source.kind=megatron", "source.path=/nowhere"])
    assert asked == [1]


def test_package_roots_are_found_without_importing():
    assert be.package_root("fp8pb_no_such_package") is None and be.has_bytecode("fp8pb_no_such_package") is None
    root = be.package_root("torch.distributed")
    assert root and os.path.isfile(os.path.join(root, "__init__.py"))
    assert be.package_root("torch.no_such_subpackage") is None


def test_a_cgroup_cpu_quota_limits_the_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert be.usable_cpus(str(tmp_path)) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")      # cgroup v1
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert be.usable_cpus(str(tmp_path)) == min(2, be.usable_cpus(str(tmp_path / "none")))


def test_the_optimized_interpreter_finds_its_own_bytecode(package):
    code = ("import sys, importlib; from megatron_fp8pb import bytecode_early as be; "
            "be.has_bytecode = lambda d='megatron.core': False; be.bytecode_will_be_written = lambda d='': False; "
            "be.usable_cpus = lambda: 3; started = be.start(('fp8pb_bc_pkg',), min_cpus=3); "
            "[p.wait(60) for p in be._state['procs']]; ctx = be.used(); ctx.__enter__(); "
            "m = importlib.import_module('fp8pb_bc_pkg.sub.mod'); print(started, m.__cached__); be.cleanup()")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(package.parent), os.getcwd()]))
    r = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("True ") and ".opt-1.pyc" in r.stdout and be.DIR_PREFIX in r.stdout


def test_a_sigterm_during_the_imports_cleans_up_and_ends_the_process(package):
    code = ("import sys, time; from megatron_fp8pb import bytecode_early as be; "
            "be.has_bytecode = lambda d='megatron.core': False; be.bytecode_will_be_written = lambda d='': False; "
            "be.usable_cpus = lambda: 3; be.cleanup_on_sigterm(); be.start(('fp8pb_bc_pkg',), min_cpus=3); "
            "print(be._state['dir'], flush=True); time.sleep(60)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(package.parent), os.getcwd()]))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    prefix = p.stdout.readline().strip()
    assert os.path.isdir(prefix)
    p.terminate()
    assert p.wait(30) == -15         # ended by the signal, as without the handler
    assert not os.path.exists(prefix)


def test_the_helpers_compile_what_the_megatron_import_loads():
    from megatron_fp8pb.parallel.megatron_import import MEGATRON_MODULES
    assert all(any(m == p or m.startswith(p + ".") for p in be.PACKAGES) for m in MEGATRON_MODULES)
