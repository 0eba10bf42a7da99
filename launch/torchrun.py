"""torchrun with a short failure summary: ``python launch/torchrun.py [torchrun options] launch/export.py ...``.

The same launcher as ``torchrun`` (``torch.distributed.run``), but when a process fails it ends with one line naming
the first failed rank and its exit code instead of torchrun's traceback and failure table: an export refusal is
already explained by its ``error:`` line, and any other failure by the traceback its rank printed.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        others = len(e.failures) - 1
        print(f"torchrun: {e.name} failed: rank {rank} exited with code {failure.exitcode}"
              f"{f' ({others} more process(es) failed)' if others else ''}; its message is above",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
