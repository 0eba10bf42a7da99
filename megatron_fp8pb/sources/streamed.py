"""A source streamed unit by unit: the Megatron parameters a rank would hold under a layout, named and shaped from
the architecture rules alone (no model is built), each loading its pieces only when the export reaches its unit.

For an HF checkpoint a parameter's pieces are read straight from the files (the rows or columns this rank exports),
so host memory holds one unit being quantized and one being read, whatever the model's depth.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import torch

from megatron_fp8pb.archs import Dims, rules_for
from megatron_fp8pb.archs.base import DUPLICATE, EXPERT, GLOBAL, TIED_COPY, VOCAB, Rule, rule_layers
from megatron_fp8pb.sources.hf import read_slice
from megatron_fp8pb.parallel.megatron import padded_vocab
from megatron_fp8pb.plan.params import Layout, ParamPlan, local_shape
from megatron_fp8pb.plan.write_order import EMBEDDING_UNIT, write_unit
from megatron_fp8pb.plan.ranks import stage_layer_range
from megatron_fp8pb.plan.tp_slices import check_piece_finite, piece_dtype


@dataclass(frozen=True)
class LazyParam:
    """A parameter known by its local shape; ``load(plan)`` returns one tensor per entry of ``plan.pieces``.
    ``reads``: where each piece can be read alone (``HFPieces``), so that the export reads them in the files' order;
    None where a parameter is read whole."""
    shape: tuple[int, ...]
    load: Callable[[ParamPlan], list[torch.Tensor]]
    dtype: torch.dtype = torch.bfloat16
    reads: object | None = None


@dataclass(frozen=True)
class HFPieces:
    """Each piece of a parameter over an HF checkpoint is one read of one source tensor: ``where`` its bytes start,
    ``load`` it (in ``dtype``, or the rule's own)."""
    reader: object
    dtype: torch.dtype

    @staticmethod
    def _slice(plan: ParamPlan, index: int):
        p = plan.pieces[index]
        return replace(p, hf_name=plan.slices[0].hf_name) if plan.fusion == DUPLICATE else p

    def where(self, plan: ParamPlan, index: int):
        s = self._slice(plan, index)
        return self.reader.first_byte(s.hf_name, s.dim if len(s.full_shape) > 1 else 0, s.offset)

    def load(self, plan: ParamPlan, index: int) -> torch.Tensor:
        s = self._slice(plan, index)
        return read_slice(self.reader, s).to(piece_dtype(s, self.dtype))


def stage_layers(d: Dims, layout: Layout) -> dict[int, int]:
    """Local decoder layer index -> global layer number of this pipeline stage (Megatron's even split; MTP layers
    are not decoder layers)."""
    return dict(enumerate(stage_layer_range(d.num_layers, layout.pp_size, layout.pp_rank)))


class LocalParam(NamedTuple):
    """A parameter of this rank's model chunk: its Megatron name and local shape, the rule it comes from (and that
    rule's index in ``rules_for``), and the global layer it is in (None for a global rule; ``num_layers + k`` for
    multi-token-prediction layer ``k``)."""
    name: str
    shape: tuple[int, ...]
    rule: Rule
    rule_index: int
    layer: int | None


def local_params(d: Dims, layout: Layout, vocab_rows: int | None = None) -> list[LocalParam]:
    """Every parameter this rank's model chunk holds that the export reads, in the order of the rules; tied
    output-layer copies (which produce nothing) are left out. A layer rule covers only the layers of its selector
    (dense / MoE layers); multi-token-prediction layers (HF layer ``num_layers + k``) are Megatron's
    ``mtp.layers.{k}.transformer_layer`` on the last stage."""
    rules = rules_for(d)
    first, last = layout.pp_rank == 0, layout.pp_rank == layout.pp_size - 1
    nle = d.num_experts // layout.ep_size if d.num_experts else 0
    prefixes = {i: f"decoder.layers.{j}." for j, i in stage_layers(d, layout).items()}
    if last:
        prefixes.update({d.num_layers + k: f"mtp.layers.{k}.transformer_layer." for k in range(d.mtp_layers)})
    out = []
    for k, rule in enumerate(rules):
        if rule.shard == TIED_COPY:
            continue
        shape = _local_shape(rule, d, layout, vocab_rows)
        if rule.scope == GLOBAL:    # the embedding's unit on the first stage, the final norm's on the last
            if (first if write_unit(rules, k, None, d) == EMBEDDING_UNIT else last):
                out.append(LocalParam(rule.mcore[0], shape, rule, k, None))
            continue
        for i in rule_layers(rule, d):
            if i not in prefixes:
                continue
            if rule.scope == EXPERT:
                out += [LocalParam(prefixes[i] + rule.mcore[0].replace("{x}", str(x)), shape, rule, k, i)
                        for x in range(nle)]
            else:
                out.append(LocalParam(prefixes[i] + rule.mcore[0], shape, rule, k, i))
    return out


def local_param_shapes(d: Dims, layout: Layout, vocab_rows: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(Megatron name, local shape) of each of ``local_params``."""
    return [(p.name, p.shape) for p in local_params(d, layout, vocab_rows)]


def _local_shape(rule, d: Dims, layout: Layout, vocab_rows: int | None) -> tuple[int, ...]:
    shapes = rule.shapes(d)
    size = layout.etp_size if rule.scope == EXPERT else layout.tp_size
    if rule.shard == VOCAB:
        rows = vocab_rows or padded_vocab(d.vocab, layout.tp_size)
        return (rows // layout.tp_size,) + tuple(shapes[0][1:])
    return local_shape(rule, d, shapes, size, rule.mcore[0], layout)


def hf_params(reader, d: Dims, layout: Layout, dtype: torch.dtype) -> list[tuple[str, LazyParam]]:
    """This rank's parameters over an HF checkpoint reader: each loads the HF slices it exports, in ``dtype`` (or the
    rule's own, e.g. the float32 expert bias)."""
    pieces = HFPieces(reader, dtype) if hasattr(reader, "first_byte") else None

    def load(plan: ParamPlan) -> list[torch.Tensor]:
        if plan.fusion == DUPLICATE:   # one source tensor written under several names (an untied lm_head)
            return [read_slice(reader, replace(p, hf_name=plan.slices[0].hf_name)).to(piece_dtype(p, dtype))
                    for p in plan.pieces]
        return [read_slice(reader, p).to(piece_dtype(p, dtype)) for p in plan.pieces]
    return [(name, LazyParam(shape, load, dtype, pieces)) for name, shape in local_param_shapes(d, layout)]


@dataclass(frozen=True)
class Deferred:
    """Piece ``index`` of ``plan``, loaded with its parameter when its unit comes."""
    param: LazyParam
    plan: ParamPlan
    index: int


def materialize(items: list, rank: int, device: torch.device | None = None, pool=None) -> list:
    """One unit's (piece, tensor | Deferred) -> (piece, tensor): each parameter loaded once (several at once on
    ``pool``, an executor, when given), every loaded piece checked finite (the error names the HF source tensor and
    the index in it, then the Megatron parameter), moved to ``device``."""
    params: dict[int, Deferred] = {}
    for _, t in items:
        if isinstance(t, Deferred):
            params.setdefault(id(t.plan), t)
    if pool is not None and len(params) > 1:
        futures = {key: pool.submit(t.param.load, t.plan) for key, t in params.items()}
        raw = {key: f.result() for key, f in futures.items()}
    else:
        raw = {key: t.param.load(t.plan) for key, t in params.items()}
    loaded: dict[int, list[torch.Tensor]] = {}
    for key, t in params.items():
        xs = raw.pop(key)
        if device is not None and device.type == "cuda":
            xs = [x.to(device) for x in xs]
        for piece, x in zip(t.plan.pieces, xs):
            check_piece_finite(piece, x, t.plan.mcore_name)
        loaded[key] = xs
    return [(p, loaded[id(t.plan)][t.index] if isinstance(t, Deferred) else t) for p, t in items]


class Prefetch:
    """Yields ``(unit, items, error)`` for ``units`` in order, loading the next unit on a thread while the caller
    works on this one; at most ``depth`` units are loaded and not yet released (``release()`` after each)."""

    def __init__(self, units: list, load: Callable, depth: int = 2):
        self._units, self._load = list(units), load
        self._tokens = threading.Semaphore(depth)
        self._q: queue.Queue = queue.Queue()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="fp8pb-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for u in self._units:
            self._tokens.acquire()
            if self._stop:
                return
            try:
                self._q.put((u, self._load(u), None))
            except (ValueError, TypeError, OSError, KeyError) as e:
                self._q.put((u, [], str(e)))
            except BaseException as e:  # noqa: BLE001 - handed to the caller, raised there
                self._q.put((u, [], e))

    def __iter__(self):
        for _ in self._units:
            u, items, error = self._q.get()
            if isinstance(error, BaseException):
                raise error
            yield u, items, error

    def release(self) -> None:
        self._tokens.release()

    def close(self) -> None:
        self._stop = True
        self._tokens.release()


def fixed_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Host tensors of ``nbytes`` or more get their own pages, returned to the OS when freed. glibc otherwise raises
    its mmap threshold after each large free (up to 32 MiB) and serves later tensors from a heap that fragments as
    units of different tensor sizes come and go: RSS then creeps up with the model's depth."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes))   # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
