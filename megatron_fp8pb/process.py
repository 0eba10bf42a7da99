"""How an export process ends: the one line and exit code of a refusal, Ctrl-C, SIGTERM, and its launcher's death.

A refusal prints ``error: ...`` once and exits 2 (``EXIT_REFUSED``). Ctrl-C prints one line on rank 0 saying what
state the output is in and exits 130: interrupted before the checkpoint was complete, its ``.partial`` directory is
removed and nothing was written; interrupted during verification, the checkpoint is complete. SIGTERM (torchrun
stops the surviving ranks with it when one fails) unwinds, so a partial output is removed. A rank whose launcher
died (``kill -9`` of torchrun or of ``megatron-fp8pb-export``) stops within seconds instead of running on.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from megatron_fp8pb.errors import EXIT_REFUSED, Refusal, debug, is_expected, message

EXIT_INTERRUPTED = 130


class _State:
    phase = "starting"              # what the job is doing, for the Ctrl-C line
    partial: Path | None = None     # the output's .partial directory while it is being written (rank 0 removes it)
    complete: Path | None = None    # the finished checkpoint, once it is in place


STATE = _State()


def set_phase(phase: str, partial: Path | None = None, complete: Path | None = None) -> None:
    """Record what the job is doing now (and where its output is), for the line Ctrl-C prints."""
    STATE.phase = phase
    if partial is not None:
        STATE.partial = partial
    if complete is not None:
        STATE.complete, STATE.partial = complete, None


def interrupted_line(what: str = "interrupted") -> str:
    """The one line Ctrl-C (or the launcher's death) prints, from the recorded phase."""
    if STATE.complete is not None:
        return (f"{what} while {STATE.phase}: the checkpoint {STATE.complete} is complete, verification was "
                f"interrupted; check it with: python -m megatron_fp8pb.verify {STATE.complete}")
    return f"{what} while {STATE.phase}; nothing was written"


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _leave(what: str, code: int) -> None:
    """Rank 0 says what state the output is in and removes a partial one; every rank leaves at once (a peer may be
    waiting in a collective that will never complete)."""
    if _env_int("RANK", 0) == 0:
        if STATE.partial is not None and STATE.complete is None:
            shutil.rmtree(STATE.partial, ignore_errors=True)
        print(f"\n{interrupted_line(what)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def handle_interrupts() -> None:
    """Ctrl-C ends the process with one line, even while the main thread waits inside a collective: the signal only
    wakes a watcher thread (``signal.set_wakeup_fd``), which does the rest."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def watch():
        while True:
            got = os.read(r, 64)
            if signal.SIGINT in got:
                _leave("interrupted", EXIT_INTERRUPTED)
    threading.Thread(target=watch, name="fp8pb-interrupt", daemon=True).start()


def exit_on_sigterm() -> None:
    """SIGTERM unwinds the main thread (``SystemExit``), so the writer removes a partial output."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def end_with_launcher(poll_s: float = 1.0) -> None:
    """Stop this process within ``poll_s`` seconds of its launcher's (the parent process's) death, as Ctrl-C does."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        _leave("stopped: the launcher exited", 128 + signal.SIGTERM)
    if parent > 1:
        threading.Thread(target=watch, name="fp8pb-launcher-watch", daemon=True).start()


def exit_code_for(e: BaseException) -> int:
    """Print the one line for an expected error on the rank that should show it; return this process's exit code.

    An everywhere-refusal is shown by global rank 0 only. torchrun counts a node as failed when any of its processes
    exits non-zero and then lists every non-zero process in its failure summary: so on each node only local rank 0
    exits non-zero (after a moment, so that its siblings have exited and are not stopped by a signal), and the
    summary names one process. Any other expected error is shown by the rank that raised it."""
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    everywhere = isinstance(e, Refusal) and e.everywhere
    if not everywhere or rank == 0:
        print(f"error: {message(e)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    if not everywhere:
        return EXIT_REFUSED
    if local_rank != 0:
        return 0
    if _env_int("LOCAL_WORLD_SIZE", 1) > 1:
        time.sleep(0.5)
    return EXIT_REFUSED


def cli(fn, *args) -> int:
    """Run ``fn(*args)``; an expected error becomes one line and an exit code (``FP8PB_DEBUG=1``: re-raised)."""
    try:
        return fn(*args)
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)) or debug() or not is_expected(e):
            raise
        code = exit_code_for(e)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        # peers may be gone: leave without the process-group teardown, which could wait for them
        sys.stderr.flush()
        os._exit(code)
    return code
