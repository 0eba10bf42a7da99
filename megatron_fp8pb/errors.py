"""Expected refusals and how the command line shows them.

A refusal is a problem with the input, the config or the environment that the message explains and says how to fix
(an impossible layout, a missing source, an existing output directory, NaN weights). The command line prints it as
one line, once, and exits non-zero; a traceback is for the unexpected (or with ``FP8PB_DEBUG=1``).
"""
from __future__ import annotations

import os
import sys
import time

DEBUG_ENV = "FP8PB_DEBUG"
EXIT_REFUSED = 2


class Refusal(ValueError):
    """An expected refusal. ``everywhere``: every rank raises the same one, so only global rank 0 shows it."""

    def __init__(self, message: str, everywhere: bool = False):
        super().__init__(message)
        self.everywhere = everywhere


def exit_on_sigterm() -> None:
    """torchrun stops the surviving ranks with SIGTERM when one fails: unwind, so a partial output is removed (and
    the command line's helpers stopped)."""
    import signal

    def handler(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def message(e: BaseException) -> str:
    """The text of an error without the quotes ``str(KeyError)`` adds."""
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        return e.args[0]
    return str(e)


def is_expected(e: BaseException) -> bool:
    """Refusals, bad values/types/keys and OS errors (missing files, no space left), also when an export stage
    wrapped them; anything else (a bug) is unexpected."""
    from .faults import ExportError
    if isinstance(e, ExportError):
        return e.__cause__ is not None and is_expected(e.__cause__)
    return isinstance(e, (ValueError, TypeError, KeyError, OSError))


def refuse_everywhere(e: BaseException) -> Refusal:
    """``e`` (raised identically on every rank, e.g. by a config check) as an everywhere-Refusal."""
    if isinstance(e, Refusal):
        e.everywhere = True
        return e
    r = Refusal(message(e), everywhere=True)
    r.__cause__ = e
    return r


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0", "false", "no")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


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


def agree(error: str | None, name_rank: bool = True, cause: BaseException | None = None) -> None:
    """Collective: every rank learns whether any rank failed a check, and all raise the first failure (naming its
    rank unless ``name_rank`` is false) as an everywhere-Refusal. ``error``: this rank's message, or None; ``cause``:
    this rank's exception, chained (``from``) to the Refusal so that ``FP8PB_DEBUG=1`` shows where it arose."""
    from megatron_fp8pb.parallel import collectives as coll
    errors = coll.gather_objects(error)
    first = None
    if errors is not None:
        bad = [(r, e) for r, e in enumerate(errors) if e]
        if bad:
            r, msg = bad[0]
            plain = not name_rank or msg.startswith("rank ") or coll.world_size() == 1
            first = msg if plain else f"rank {r}: {msg}"
    first = coll.broadcast_object(first)
    if first:
        raise Refusal(first, everywhere=True) from cause


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
