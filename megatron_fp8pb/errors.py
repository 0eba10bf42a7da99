"""Expected refusals and how the command line shows them.

A refusal is a problem with the input, the config or the environment that the message explains and says how to fix
(an impossible layout, a missing source, an existing output directory, NaN weights). The command line prints it as
one line, once, and exits non-zero (``process``); a traceback is for the unexpected (or with ``FP8PB_DEBUG=1``).
"""
from __future__ import annotations

import os

DEBUG_ENV = "FP8PB_DEBUG"
EXIT_REFUSED = 2


class ExportError(RuntimeError):
    """An export failure that names the rank and the stage."""


class Refusal(ValueError):
    """An expected refusal. ``everywhere``: every rank raises the same one, so only global rank 0 shows it."""

    def __init__(self, message: str, everywhere: bool = False):
        super().__init__(message)
        self.everywhere = everywhere


def message(e: BaseException) -> str:
    """The text of an error without the quotes ``str(KeyError)`` adds."""
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        return e.args[0]
    return str(e)


def is_expected(e: BaseException) -> bool:
    """Refusals, bad values/types/keys and OS errors (missing files, no space left), also when an export stage
    wrapped them; anything else (a bug) is unexpected."""
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
