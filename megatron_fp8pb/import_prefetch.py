"""Reading the Python modules the export will import into the page cache, alongside the source's readahead.

From a cold disk an import reads its modules one small file at a time, each read waiting behind the readahead's
large reads of the source: megatron-core with what it imports (sympy and mpmath through torch's DTensor) is
thousands of such files, seconds spent in the queue. Read on many threads at once from process start, their waits
overlap, and the files are in memory by the time the import reaches them. Only Python files are read (the
compiled files of this interpreter, ``.py`` sources without one): a package's shared libraries are large and a cold
import touches a fraction of them. A hint only: anything unreadable is skipped, and
nothing here imports a package (``find_spec`` of a top-level name only locates it). Torch-free, like the readahead.
"""
from __future__ import annotations

import importlib.util
import os
import threading
from collections import deque
from pathlib import Path

THREADS = 32        # small reads in flight: their latency overlaps
MAX_FILE = 4 << 20  # larger Python files are left to the import itself
# what the export imports, by source kind: torch's own Python first (it is imported first), then the rest
PACKAGES = {
    "common": ("torch", "numpy", "safetensors", "yaml", "triton"),
    "megatron": ("megatron", "sympy", "mpmath"),
}


def package_dirs(name: str) -> list[Path]:
    """The directories of top-level package ``name`` (several for a namespace package), without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


SKIPPED_DIRS = ("tests", "test", "__pycache__")     # test suites shipped inside packages are never imported


def _module_files(d: str, root: bool) -> tuple[list[str], list[str]]:
    """Directory ``d`` -> (the files an import of its modules reads: each module's compiled file as this interpreter
    names it (``importlib.util.cache_from_source``: its optimization level, PYTHONPYCACHEPREFIX), or its ``.py``
    source where that is missing; its subdirectories, symbolic links not followed). Below a package's ``root``, a
    directory without ``__init__.py`` (data, headers) is not a package and is skipped."""
    with os.scandir(d) as it:
        entries = list(it)
    if not root and not any(e.name == "__init__.py" for e in entries):
        return [], []
    cache = os.path.dirname(importlib.util.cache_from_source(os.path.join(d, "m.py")))
    try:
        compiled = set(os.listdir(cache))
    except OSError:
        compiled = set()
    files, subdirs = [], []
    for e in entries:
        if e.name.endswith(".py"):
            pyc = importlib.util.cache_from_source(e.path)
            files.append(pyc if os.path.basename(pyc) in compiled else e.path)
        elif e.name not in SKIPPED_DIRS and e.is_dir(follow_symlinks=False):
            subdirs.append(e.path)
    return files, subdirs


def _read(path: str) -> int:
    try:
        with open(path, "rb", buffering=0) as f:
            if os.fstat(f.fileno()).st_size > MAX_FILE:
                return 0
            return len(f.read())
    except OSError:
        return 0


def prefetch(packages: tuple[str, ...], threads: int = THREADS) -> int:
    """Read the module files of ``packages`` (their directories walked and their files read by ``threads`` threads at
    once, ``packages`` in order): the bytes read."""
    tasks = deque(("root", str(root)) for name in packages for root in package_dirs(name))
    cv = threading.Condition()
    state = {"busy": 0, "bytes": 0}

    def work():
        while True:
            with cv:
                while not tasks and state["busy"]:
                    cv.wait()
                if not tasks:
                    cv.notify_all()
                    return
                what, path = tasks.popleft()
                state["busy"] += 1
            got, more = 0, []
            try:
                if what == "file":
                    got = _read(path)
                else:
                    files, subdirs = _module_files(path, what == "root")
                    more = [("file", f) for f in files] + [("dir", d) for d in subdirs]
            except Exception:       # a hint only: whatever cannot be listed or read is left to the import
                pass
            finally:
                with cv:
                    tasks.extend(more)
                    state["busy"] -= 1
                    state["bytes"] += got
                    cv.notify_all()

    pool = [threading.Thread(target=work, name="fp8pb-prefetch", daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return state["bytes"]


def start(kind: str) -> threading.Thread:
    """Prefetch, on a background thread, what the export of a ``kind`` source imports."""
    t = threading.Thread(target=prefetch, args=(PACKAGES["common"] + PACKAGES.get(kind, ()),),
                         name="fp8pb-prefetch", daemon=True)
    t.start()
    return t
