"""Named export stages, and fault injection at them for the reliability tests.

``FP8PB_INJECT_FAULT="<rank>:<stage>:<kind>"`` makes global rank ``<rank>`` fail on entering ``<stage>``
(plan, transfer, write) with ``<kind>``: ``raise`` (an exception), ``kill`` (SIGKILL itself), ``hang`` (sleep
forever, so its peers hit the collective timeout) or ``enospc`` (an OSError "no space left" from the disk write).
Unset, it does nothing.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import time

from megatron_fp8pb.errors import ExportError, Refusal, message

ENV = "FP8PB_INJECT_FAULT"


def inject(stage: str, rank: int) -> None:
    """Fail here when FP8PB_INJECT_FAULT names ``rank`` (this process's global rank) and ``stage``."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, where, kind = spec.split(":")
    if int(target) != rank or where != stage:
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        while True:
            time.sleep(3600)
    if kind == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device (injected)")
    raise RuntimeError(f"injected failure at stage {stage!r}")


@contextlib.contextmanager
def stage(name: str, rank: int):
    """Run a stage of global rank ``rank``; a failure is re-raised naming the rank and the stage: bad values as a
    Refusal, anything else as an ExportError (both ``from`` the original)."""
    try:
        inject(name, rank)
        yield
    except (ExportError, Refusal):
        raise
    except (ValueError, TypeError, KeyError, FileExistsError, PermissionError) as e:
        raise Refusal(f"rank {rank}, stage {name}: {message(e)}") from e
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ExportError(f"rank {rank}, stage {name}: {type(e).__name__}: {e}") from e
