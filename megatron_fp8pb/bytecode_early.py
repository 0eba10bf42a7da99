"""Compiling the Python modules that megatron-core's import loads, on spare cores, while torch is imported.

Where an installation ships no bytecode (an image built with ``--no-compile``, ``PYTHONDONTWRITEBYTECODE=1``), every
export from a Megatron checkpoint compiles megatron-core and what it imports (torch.distributed with DTensor, sympy,
mpmath: some 1,000 modules) from source on its one interpreter thread before it can read a tensor: seconds on the
critical path. Helper processes started with the command line compile them in parallel into a private
``sys.pycache_prefix`` directory while the main process imports torch; megatron-core is then imported with that
prefix and finds its bytecode made. Nothing is written next to the installed sources. The directory is removed at
the end of the job, also when it is refused, fails or gets SIGTERM; the helpers end with the job, and a directory
left by a killed job is removed by the next. Nothing is started where megatron-core's bytecode exists (a normal
installation) or where the import would write it itself (once, for every later run), nor with fewer than
``MIN_CPUS`` cores per rank (affinity and cgroup quota). A hint only: any module the helpers did not compile is
compiled by the import itself, as without them.

This module is torch-free and also runs as the helpers' script (stdlib only).
"""
from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time

# what importing megatron-core (with torch.compile a plain decorator) and torch.distributed.checkpoint loads beyond
# torch's own import: packages or subpackages, each compiled whole (test suites left out)
PACKAGES = ("megatron.core", "sympy", "mpmath", "torch.distributed", "torch.fx", "torch.utils", "setuptools",
            "yaml", "packaging")
MIN_CPUS = 4            # below this the helpers would take the cores the main process imports on
MAX_HELPERS = 8
WAIT_S = 3.0            # the longest the import waits for the helpers (then it compiles what they have not)
SKIPPED_DIRS = ("tests", "test", "__pycache__")     # import_prefetch's, repeated: the helpers' script is stdlib-only
DIR_PREFIX = "fp8pb-bytecode-"     # then the host's tag and the job's pid: what a killed job left, the next removes

_state: dict = {}       # "dir": the prefix directory, "procs": the helper processes


def package_root(dotted: str) -> str | None:
    """The directory of a package or subpackage, without importing it (``import_prefetch.package_dirs`` of the
    top-level name). Imported here, not at the top: this file also runs as the helpers' script, outside the package."""
    from .import_prefetch import package_dirs
    top, *rest = dotted.split(".")
    for loc in package_dirs(top):
        path = os.path.join(loc, *rest)
        if os.path.isdir(path):
            return path
    return None


def has_bytecode(dotted: str = "megatron.core") -> bool | None:
    """Whether the package's ``__init__`` has its compiled file where this interpreter looks (None: no package)."""
    root = package_root(dotted)
    if root is None:
        return None
    return os.path.exists(importlib.util.cache_from_source(os.path.join(root, "__init__.py")))


def _cgroup_quotas(cgroup: str) -> list[tuple[str, str]]:
    """(quota, period) pairs that may limit this process: cgroup v2 ``cpu.max`` of its own cgroup and of the root,
    cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``."""
    out = []
    own = ""
    try:
        for line in open("/proc/self/cgroup"):
            if line.startswith("0::"):
                own = line.strip()[3:].lstrip("/")
    except OSError:
        pass
    for d in {os.path.join(cgroup, own), cgroup}:
        try:
            out.append(tuple(open(os.path.join(d, "cpu.max")).read().split()[:2]))
        except (OSError, ValueError):
            pass
    for d in ("cpu,cpuacct", "cpu"):
        try:
            out.append((open(os.path.join(cgroup, d, "cpu.cfs_quota_us")).read().strip(),
                        open(os.path.join(cgroup, d, "cpu.cfs_period_us")).read().strip()))
        except OSError:
            pass
    return out


def usable_cpus(cgroup: str = "/sys/fs/cgroup") -> int:
    """The cores this process may run on (its affinity), within its cgroup's CPU quota where one is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    for quota, period in _cgroup_quotas(cgroup):
        try:
            if quota not in ("max", "-1"):
                n = min(n, max(1, int(quota) // int(period)))
        except ValueError:
            pass
    return n


def local_ranks() -> int:
    """Ranks of this job on this node, from the launcher's environment (torchrun, Open MPI, Slurm); 1 if unknown."""
    for var in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        digits = "".join(itertools.takewhile(str.isdigit, os.environ.get(var, "")))
        if digits and int(digits) > 0:
            return int(digits)
    return 1


def bytecode_will_be_written(dotted: str = "megatron.core") -> bool:
    """Whether this interpreter's import would write the package's bytecode itself (writing allowed, its cache
    directory writable): then it is compiled once, by the first run, and later runs find it."""
    root = package_root(dotted)
    if sys.dont_write_bytecode or root is None:
        return False
    cache = os.path.dirname(importlib.util.cache_from_source(os.path.join(root, "__init__.py")))
    while not os.path.exists(cache):
        cache = os.path.dirname(cache)
    return os.access(cache, os.W_OK)


def _host_tag() -> str:
    """This host and pid namespace, short: a pid in a directory's name means something only where this tag matches
    (a temporary directory may be shared by hosts or containers)."""
    import hashlib
    import socket
    try:
        ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        ns = ""
    return hashlib.sha1(f"{socket.gethostname()}/{ns}".encode()).hexdigest()[:8]


def _sweep_stale(tmp: str) -> None:
    """Remove helper directories left by jobs of this host that no longer run (killed before they could remove
    them): this user's, named with this host's tag and a pid that no longer exists."""
    import stat
    tag = _host_tag()
    try:
        names = os.listdir(tmp)
    except OSError:
        return
    for name in names:
        parts = name[len(DIR_PREFIX):].split("-")
        if not name.startswith(DIR_PREFIX) or len(parts) < 3 or parts[0] != tag:
            continue
        path = os.path.join(tmp, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                continue
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (OSError, ValueError, OverflowError):
            pass


def start(packages: tuple[str, ...] = PACKAGES, min_cpus: int | None = None) -> bool:
    """Start the helpers where megatron-core has no bytecode and cores are spare; whether they were started. Each
    rank of a node starts its own, sized to its share of the node's cores."""
    if _state or has_bytecode() is not False or bytecode_will_be_written():
        return False
    share = usable_cpus() // local_ranks()
    if share < (MIN_CPUS if min_cpus is None else min_cpus):
        return False
    roots = [r for r in (package_root(p) for p in packages) if r]
    _sweep_stale(tempfile.gettempdir())
    try:
        prefix = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{_host_tag()}-{os.getpid()}-")
    except OSError:
        return False
    n = max(1, min(MAX_HELPERS, share - 2))     # the main process and the readahead keep two
    # isolated (-I: not this package's directory on sys.path, no user environment), writing no bytecode of its own
    # imports (-B), at the main interpreter's optimization level (the file names the import looks for)
    cmd = [sys.executable, "-I", "-B"] + (["-" + "O" * sys.flags.optimize] if sys.flags.optimize else [])
    _state.update(dir=prefix, procs=[])
    try:
        for k in range(n):
            _state["procs"].append(subprocess.Popen(
                cmd + [os.path.abspath(__file__), prefix, str(k), str(n), str(os.getpid()), *roots],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    except OSError:
        cleanup()
        return False
    return True


def start_for_command_line(config_path: str | None, overrides: list[str]) -> bool:
    """``start`` for a job whose source imports megatron-core (a config the job will refuse starts nothing)."""
    try:
        from .config import MCORE_FREE_KINDS, load_config
        if load_config(config_path, overrides).source.kind in MCORE_FREE_KINDS:
            return False
        return start()
    except Exception:
        return False


@contextlib.contextmanager
def used():
    """Import with the helpers' bytecode: wait for them (at most ``WAIT_S``), point ``sys.pycache_prefix`` at their
    directory for the duration, then restore it and clean up. Without helpers, nothing changes."""
    if not _state:
        yield
        return
    deadline = time.monotonic() + WAIT_S
    for p in _state["procs"]:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            break
    before = sys.pycache_prefix
    sys.pycache_prefix = _state["dir"]
    try:
        yield
    finally:
        sys.pycache_prefix = before
        cleanup()       # imported: the helpers and their files are no longer wanted


def _stop_helpers(wait: bool = True) -> None:
    for p in _state.get("procs", []):
        if p.poll() is None:
            p.kill()
            if wait:
                p.wait()


def cleanup() -> None:
    """Stop any helper still running and remove the directory."""
    _stop_helpers()
    _state.pop("procs", None)
    d = _state.pop("dir", None)
    if d:
        shutil.rmtree(d, ignore_errors=True)


def cleanup_on_sigterm() -> None:
    """A SIGTERM before the job installs its own handler (during the imports) cleans up, then ends the process as
    the signal would have."""
    import signal

    def handler(signum, frame):
        _stop_helpers(wait=False)       # a wait here could deadlock with one the signal interrupted
        if _state.get("dir"):
            shutil.rmtree(_state["dir"], ignore_errors=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:      # an ignored SIGTERM stays ignored
        signal.signal(signal.SIGTERM, handler)


def module_files(roots: list[str]) -> list[str]:
    """The ``.py`` files under ``roots``, test suites left out, in a fixed order (every helper takes its share)."""
    files = []
    for root in roots:
        for d, dirs, names in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x not in SKIPPED_DIRS)
            files += [os.path.join(d, f) for f in sorted(names) if f.endswith(".py")]
    return files


def _die_with(parent: int) -> None:
    """End this helper when ``parent`` ends, however it ends (Linux ``PR_SET_PDEATHSIG``; elsewhere checked per
    file)."""
    try:
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:      # the parent ended before the line above
        os._exit(0)


def compile_share(prefix: str, k: int, n: int, roots: list[str], parent: int | None = None) -> int:
    """Helper ``k`` of ``n``: compile every n-th file into ``prefix`` as the import will look for it (the same
    interpreter, optimization level and timestamp check), while ``parent`` runs; the files compiled."""
    import py_compile
    sys.pycache_prefix = prefix
    done = 0
    for path in module_files(roots)[k::n]:
        if parent is not None and os.getppid() != parent:
            break       # the job has ended: nothing more is wanted
        try:
            py_compile.compile(path, cfile=importlib.util.cache_from_source(path), doraise=True, quiet=2,
                               invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
            done += 1
        except Exception:   # a file that does not compile is the import's to report, if it is ever imported
            pass
    return done


if __name__ == "__main__":
    _die_with(int(sys.argv[4]))
    compile_share(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[5:], parent=int(sys.argv[4]))
