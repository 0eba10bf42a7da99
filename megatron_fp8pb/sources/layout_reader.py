"""The export's reader of a streamed source, reading pieces in the order their bytes lie in the files.

Every piece this rank exports is one positioned read of one source tensor (``LazyParam.reads``), so the reads can go
in the files' order (``read_plan.schedule``: ascending offsets within each file, a few files at a time, one read in
flight per file) rather than in the order the export writes. Units are handed on in ``read_plan.unit_order``, the
order in which their last bytes arrive under that same plan; a unit waits only for its own pieces. The output does
not depend on this order: the writer places every tensor at its planned offset.

Memory stays bounded: at most ``budget`` bytes are read and not yet released by the caller (two of this rank's
largest units by default, as the unit-by-unit reader held); past it, only pieces of the unit the caller waits for are
read, so the reading always moves on.
"""
from __future__ import annotations

import threading
import time
from collections import deque

import torch

from megatron_fp8pb.plan.tp_slices import check_piece_finite
from megatron_fp8pb.sources.read_plan import FILES_AT_ONCE, schedule


def piece_bytes(piece, dtype: torch.dtype) -> int:
    """Bytes of ``piece`` (its rows or columns of the full tensor) in ``dtype``."""
    n = 1
    for k, s in enumerate(piece.full_shape):
        n *= piece.length if k == piece.dim else s
    return n * torch.empty((), dtype=dtype).element_size()


def reads_by_layout(units: dict[int, list]) -> bool:
    """Whether every deferred piece of ``units`` (``{unit: [(piece, tensor | Deferred)]}``) knows where its bytes
    lie (``LazyParam.reads``), so that ``LayoutReader`` can read them."""
    from megatron_fp8pb.sources.streamed import Deferred
    lazy = [t for items in units.values() for _, t in items if isinstance(t, Deferred)]
    return bool(lazy) and all(t.param.reads is not None for t in lazy)


class LayoutReader:
    """Yields ``(unit, items, error)`` for ``order``, each unit's ``(piece, tensor)`` once all its pieces are read;
    ``release()`` after each frees its bytes from the budget. ``error``: a message where a piece could not be read
    (a bad source), None otherwise; anything else is raised to the caller."""

    def __init__(self, order: list[int], units: dict[int, list], device: torch.device | None = None,
                 budget: int | None = None, files_at_once: int = FILES_AT_ONCE, phases=None):
        from megatron_fp8pb.sources.streamed import Deferred
        self._order, self._device, self._phases = list(order), device, phases
        self._items = {u: list(units.get(u, [])) for u in self._order}
        self._got = {u: [None if isinstance(t, Deferred) else t for _, t in items] for u, items in self._items.items()}
        self._left = {u: sum(isinstance(t, Deferred) for _, t in items) for u, items in self._items.items()}
        self._errors: dict[int, str] = {}
        self._fatal: BaseException | None = None
        self._unit_bytes = dict.fromkeys(self._order, 0)
        jobs = []       # (unit, index in unit, file, first byte, bytes)
        for u, items in self._items.items():
            for k, (p, t) in enumerate(items):
                if isinstance(t, Deferred):
                    f, at = t.param.reads.where(t.plan, t.index)
                    n = piece_bytes(p, t.param.dtype)
                    jobs.append((u, k, f, at, n))
                    self._unit_bytes[u] += n
        self._jobs = jobs
        timed = schedule([(str(j), f, at, n) for j, (_, _, f, at, n) in enumerate(jobs)], files_at_once)
        self._by_file: dict = {}         # file -> its pending jobs, in read order
        self._by_unit: dict = {}         # unit -> its pending jobs, in read order
        self._rank = [0] * len(jobs)    # job -> its place in the plan's order
        for pos, r in enumerate(timed):
            j = int(r.name)
            self._rank[j] = pos
            self._by_file.setdefault(r.file, deque()).append(j)
            self._by_unit.setdefault(jobs[j][0], deque()).append(j)
        self._taken = [False] * len(jobs)
        self._busy: set = set()
        self.budget = budget if budget is not None else 2 * max(self._unit_bytes.values(), default=0)
        self._held = 0
        self.peak_held = 0              # the most bytes read and not yet released at any time
        self._waiting: int | None = None    # the unit the caller waits for, read past the budget
        self._yielded: int | None = None
        self._stop = False
        self.reads: list[tuple[object, int]] = []     # (file, first byte) of every read, in the order issued
        self._cv = threading.Condition()
        workers = max(1, min(files_at_once, len(self._by_file)))
        self._threads = [threading.Thread(target=self._run, name="fp8pb-reader", daemon=True)
                         for _ in range(workers if jobs else 0)]
        for t in self._threads:
            t.start()

    def _head(self, q: deque) -> int | None:
        while q and self._taken[q[0]]:
            q.popleft()
        return q[0] if q else None

    def _pick(self) -> int | None:
        """The next read: the earliest pending one of a file no read is in flight on, within the budget; past the
        budget, only the earliest pending read of the unit the caller is waiting for (none while it works)."""
        heads = [(j, f) for f, q in self._by_file.items() if f not in self._busy and (j := self._head(q)) is not None]
        if not heads:
            return None
        j = min(heads, key=lambda h: self._rank[h[0]])[0]
        if self._held == 0 or self._held + self._jobs[j][4] <= self.budget:
            return j
        q = self._by_unit.get(self._waiting) if self._waiting is not None else None
        for k in (q or ()):
            if not self._taken[k] and self._jobs[k][2] not in self._busy:
                return k
        return None

    def _run(self) -> None:
        from megatron_fp8pb.sources.streamed import Deferred
        while True:
            with self._cv:
                while not self._stop and (j := self._pick()) is None:
                    if not any(self._head(q) is not None for q in self._by_file.values()):
                        return
                    self._cv.wait()
                if self._stop:
                    return
                u, k, f, at, n = self._jobs[j]
                self._taken[j] = True
                self._busy.add(f)
                self._held += n
                self.peak_held = max(self.peak_held, self._held)
                self.reads.append((f, at))
            piece, t = self._items[u][k]
            assert isinstance(t, Deferred)
            t0, x, error, fatal = time.perf_counter(), None, None, None
            try:
                x = t.param.reads.load(t.plan, t.index)
                if self._device is not None and self._device.type == "cuda":
                    x = x.to(self._device)
                check_piece_finite(piece, x, t.plan.mcore_name)
            except (ValueError, TypeError, OSError, KeyError) as e:
                error = str(e)
            except BaseException as e:  # noqa: BLE001 - handed to the caller, raised there
                fatal = e
            if self._phases is not None and x is not None:
                self._phases.add("read", time.perf_counter() - t0, x.numel() * x.element_size())
            with self._cv:
                self._busy.discard(f)
                self._got[u][k] = x
                if error is not None:
                    self._errors.setdefault(u, error)
                if fatal is not None and self._fatal is None:
                    self._fatal = fatal
                self._left[u] -= 1
                self._cv.notify_all()

    def __iter__(self):
        for u in self._order:
            with self._cv:
                self._waiting = u
                self._cv.notify_all()
                while self._left[u] and self._fatal is None:
                    self._cv.wait()
                self._waiting = None
                if self._fatal is not None:
                    raise self._fatal
                self._yielded = u
                error = self._errors.get(u)
                items = [] if error else [(p, x) for (p, _), x in zip(self._items[u], self._got[u])]
                self._got[u] = []
            yield u, items, error

    def release(self) -> None:
        """The caller is done with the unit last yielded: its bytes leave the budget."""
        with self._cv:
            if self._yielded is not None:
                self._held -= self._unit_bytes[self._yielded]
                self._yielded = None
                self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
