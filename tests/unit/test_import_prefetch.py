"""The import prefetch reads a package's module files (compiled where compiled, else the source) without importing
it."""
from __future__ import annotations

import sys

from megatron_fp8pb import import_prefetch


def _package(root, tag):
    pkg = root / "fp8pb_fake_pkg"
    (pkg / "sub" / "__pycache__").mkdir(parents=True)
    (pkg / "__pycache__").mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (pkg / "__pycache__" / f"__init__.{tag}.pyc").write_bytes(b"c" * 100)
    (pkg / "plain.py").write_text("x = 1\n")                       # no compiled file: the source is read
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "__pycache__" / f"__init__.{tag}.pyc").write_bytes(b"c" * 30)
    (pkg / "sub" / "__pycache__" / "__init__.other-99.pyc").write_bytes(b"o" * 1000)    # another interpreter's
    (pkg / "sub" / "data.bin").write_bytes(b"d" * 5000)            # not a module
    (pkg / "tests").mkdir()                                         # a test suite shipped inside: never imported
    (pkg / "tests" / "__init__.py").write_text("t" * 900)
    (pkg / "include" / "deep").mkdir(parents=True)                  # not a package (no __init__.py)
    (pkg / "include" / "deep" / "gen.py").write_text("g" * 700)
    return pkg


def test_reads_each_modules_compiled_file_or_source_without_importing(tmp_path, monkeypatch):
    tag = sys.implementation.cache_tag
    pkg = _package(tmp_path, tag)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_prefetch.package_dirs("fp8pb_fake_pkg") == [pkg]
    got = import_prefetch.prefetch(("fp8pb_fake_pkg",), threads=3)
    assert got == 100 + len("x = 1\n") + 30
    assert "fp8pb_fake_pkg" not in sys.modules


def test_unknown_packages_and_unreadable_files_are_skipped(tmp_path, monkeypatch):
    pkg = _package(tmp_path, sys.implementation.cache_tag)
    (pkg / "gone.py").symlink_to(tmp_path / "missing.py")          # listed, but cannot be opened
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_prefetch.prefetch(("fp8pb_no_such_package",)) == 0
    got = import_prefetch.prefetch(("fp8pb_no_such_package", "fp8pb_fake_pkg"), threads=2)
    assert got == 136


def test_compiled_files_under_a_pycache_prefix_are_read(tmp_path, monkeypatch):
    tag = sys.implementation.cache_tag
    pkg = tmp_path / "src" / "fp8pb_fake_prefixed"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / f"__init__.{tag}.pyc").write_bytes(b"x" * 7)      # not where the interpreter looks
    mirror = tmp_path / "prefix" / str(pkg).lstrip("/")
    mirror.mkdir(parents=True)
    (mirror / f"__init__.{tag}.pyc").write_bytes(b"c" * 50)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "prefix"))
    assert import_prefetch.prefetch(("fp8pb_fake_prefixed",)) == 50


def test_a_directory_link_back_up_the_tree_is_not_followed(tmp_path, monkeypatch):
    pkg = _package(tmp_path, sys.implementation.cache_tag)
    (pkg / "sub" / "loop").symlink_to(pkg, target_is_directory=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_prefetch.prefetch(("fp8pb_fake_pkg",), threads=2) == 136


def test_a_failure_inside_a_worker_does_not_leave_the_pool_waiting(tmp_path, monkeypatch):
    import threading
    _package(tmp_path, sys.implementation.cache_tag)
    monkeypatch.syspath_prepend(str(tmp_path))
    real, calls = import_prefetch._read, []

    def flaky(path):
        calls.append(path)
        if len(calls) == 1:
            raise RuntimeError("unexpected")
        return real(path)
    monkeypatch.setattr(import_prefetch, "_read", flaky)
    t = threading.Thread(target=import_prefetch.prefetch, args=(("fp8pb_fake_pkg",), 3), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive() and len(calls) == 3
