"""A dense GPT's Megatron distributed checkpoint read without megatron-core.

megatron-core's import (its parallel state, DTensor and sympy through torch.distributed.checkpoint) takes seconds
before the first byte can be quantized, while the disk has nothing to write. For the parameters every dense GPT
is made of (rules of scope global / layer, fused as qkv or gated or not at all, sharded column-, row-wise, by
vocabulary or replicated: Llama, Mistral, Qwen2, Qwen3), what megatron-core's ``sharded_state_dict`` says is fixed
and is computed here from the rules:

- a layer's key is ``decoder.layers.<name>`` with the global layer prepended as axis 0 (a homogeneous stack), or
  ``decoder.layers.<global layer>.<name>``; any of the rule's Megatron names (the local spec saves its layer norms
  under TransformerEngine's, ``self_attention.linear_qkv.layer_norm_weight``);
- a column-parallel or vocabulary tensor is split evenly along dim 0 (the padded vocabulary), a row-parallel one
  along dim 1, a replicated one is whole;
- a gated fc1 is saved as ``[gate; up]`` of the whole MLP cut into ``2 * tp`` row blocks: rank ``r`` holds blocks
  ``r`` and ``tp + r``.

Anything else (experts, latent attention, DeltaNet parts, an untied copy) or a key found under no name leaves the
checkpoint to megatron-core (``plain_source`` returns None). The chunks are read with ``distcp.DirectReads``, or with
torch's reader where a chunk cannot be located. ``tests/dist/test_megatron_plain.py`` checks every parameter
against megatron-core's own reading at several layouts, and the CLI's exports byte for byte.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from megatron_fp8pb.archs import Dims, rules_for
from megatron_fp8pb.archs.base import (COLWISE, GATED, GLOBAL, LAYER, PLAIN, QKV, REPLICATED, ROWWISE, TIED_COPY,
                                       VOCAB, Rule, rule_layers)
from megatron_fp8pb.plan.params import Layout, ParamPlan
from megatron_fp8pb.plan.tp_slices import pieces_of
from megatron_fp8pb.sources.distcp import DirectReads, read_items
from megatron_fp8pb.sources.distcp_layout import SavedIndex, check_torch_dist, chunk_name, saved_index
from megatron_fp8pb.sources.streamed import LazyParam, LocalParam, local_params

_SHARDS = {COLWISE, ROWWISE, REPLICATED, VOCAB, TIED_COPY}
_FUSIONS = {PLAIN, QKV, GATED}


def plain_rules(d: Dims) -> bool:
    """Whether every rule of the architecture is one this module maps (module docstring)."""
    return not d.num_experts and not d.mtp_layers and all(
        r.scope in (GLOBAL, LAYER) and r.fusion in _FUSIONS and r.shard in _SHARDS and not r.alt_shard
        and r.parts is None and r.dtype is None and not r.as_stored for r in rules_for(d))


@dataclass(frozen=True)
class Keys:
    """Where each rule's parameter lies in the checkpoint: ``keys[(rule index, global layer or None)]`` = (key,
    whether the global layer is prepended as axis 0)."""
    index: SavedIndex
    keys: dict[tuple[int, int | None], tuple[str, bool]]


def plain_source(kind: str, path: str | None, hf_config: str | None, use_megatron_core: bool) -> Keys | None:
    """The keys of a Megatron source this module reads (``source.kind``, ``source.path``, ``source.hf_config`` and
    ``source.megatron_core``), or None where megatron-core must (or is asked to) map it; the same answer for the
    command line, which decides from it whether to import megatron-core, and for ``registry.build_source`` (kept
    while the checkpoint's ``.metadata`` and the config are the same files)."""
    if kind != "megatron" or use_megatron_core or not path or not hf_config:
        return None
    config = os.path.join(hf_config, "config.json") if os.path.isdir(hf_config) else hf_config
    return _plain_source(os.path.realpath(path), hf_config, _stamp(os.path.join(path, ".metadata")),
                         _stamp(config))


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
        return st.st_mtime_ns, st.st_size
    except OSError:
        return None


@functools.lru_cache(maxsize=8)
def _plain_source(path: str, hf_config: str, *stamps) -> Keys | None:
    try:
        from megatron_fp8pb.archs import dims_from_hf
        from megatron_fp8pb.sources.hf import hf_config as read_config
        check_torch_dist(path)
        return plain_keys(path, dims_from_hf(read_config(hf_config)))
    except Exception:       # noqa: BLE001 - megatron-core's reading names whatever is wrong with it
        return None


def plain_keys(path: str, d: Dims) -> Keys | None:
    """The checkpoint keys of every parameter of ``d``'s rules, or None where the architecture or the checkpoint is
    not one this module reads (megatron-core then reads it)."""
    if not plain_rules(d):
        return None
    index = saved_index(path)
    if index is None or index.transformed:
        return None
    keys = {}
    for k, rule in enumerate(rules_for(d)):
        if rule.shard == TIED_COPY:
            continue
        for layer in (rule_layers(rule, d) if rule.scope == LAYER else [None]):
            found = _key_of(rule, layer, index)
            if found is None:
                return None
            keys[(k, layer)] = found
    return Keys(index, keys)


def _key_of(rule: Rule, layer: int | None, index: SavedIndex) -> tuple[str, bool] | None:
    for name in rule.mcore:
        if layer is None:
            if name in index.shapes:
                return name, False
            continue
        if f"decoder.layers.{layer}.{name}" in index.shapes:
            return f"decoder.layers.{layer}.{name}", False
        if f"decoder.layers.{name}" in index.shapes:
            return f"decoder.layers.{name}", True
    return None


@dataclass(frozen=True)
class Region:
    """A box of a checkpoint key's global tensor that fills rows ``[dest_row, dest_row + rows)`` of the local
    tensor (all of it where the tensor is not gated)."""
    key: str
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    dest_row: int


def regions(p: LocalParam, key: str, stacked: bool, layout: Layout, num_layers: int) -> tuple[list[Region], tuple]:
    """The boxes of ``key`` that make parameter ``p`` on this rank, and the key's global shape they imply."""
    tp, r, shape = layout.tp_size, layout.tp_rank, tuple(p.shape)
    rule = p.rule
    if rule.fusion == GATED:
        half = shape[0] // 2
        rest = tuple(0 for _ in shape[1:])
        boxes = [((r * half,) + rest, (half,) + shape[1:], 0), (((tp + r) * half,) + rest, (half,) + shape[1:], half)]
        full = (2 * half * tp,) + shape[1:]
    elif rule.shard == REPLICATED:
        boxes, full = [(tuple(0 for _ in shape), shape, 0)], shape
    else:
        dim = 1 if rule.shard == ROWWISE else 0
        off = [0] * len(shape)
        off[dim] = r * shape[dim]
        full = tuple(s * tp if k == dim else s for k, s in enumerate(shape))
        boxes = [(tuple(off), shape, 0)]
    if stacked:
        boxes = [((p.layer,) + o, (1,) + s, row) for o, s, row in boxes]
        full = (num_layers,) + full
    return [Region(key, o, s, row) for o, s, row in boxes], full


@dataclass(frozen=True)
class Item:
    """One read: the box ``lengths`` at ``storage_offsets`` of a saved chunk (``storage_index``: its key and
    offset) into ``dest_offsets`` of a region (``region``)."""
    storage_index: tuple[str, tuple[int, ...]]
    storage_offsets: tuple[int, ...]
    dest_offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    region: Region


def items_of(region: Region, index: SavedIndex, path: str, name: str) -> list[Item]:
    """The reads that fill ``region`` from the saved chunks it overlaps; ValueError where they do not cover it."""
    out, covered = [], 0
    for c_off, (c_size, _) in index.chunks[region.key].items():
        lo = [max(a, b) for a, b in zip(region.offset, c_off)]
        hi = [min(a + n, b + m) for a, n, b, m in zip(region.offset, region.shape, c_off, c_size)]
        if all(x < y for x, y in zip(lo, hi)):
            n = tuple(y - x for x, y in zip(lo, hi))
            out.append(Item((region.key, c_off), tuple(x - b for x, b in zip(lo, c_off)),
                            tuple(x - a for x, a in zip(lo, region.offset)), n, region))
            covered += math.prod(n)
    if covered != math.prod(region.shape):
        raise ValueError(f"Megatron checkpoint {path}: the saved chunks of {region.key!r} cover {covered} of the "
                         f"{math.prod(region.shape)} elements at offset {list(region.offset)} size "
                         f"{list(region.shape)} (parameter {name}); the checkpoint is incomplete (an interrupted "
                         f"save?)")
    return out


class _Storage(dict):
    """Saved chunk (key, offset) -> where its bytes lie, as ``distcp.read_items`` asks."""

    def __init__(self, index: SavedIndex, path: str):
        super().__init__()
        for key, chunks in index.chunks.items():
            for off, (_, c) in chunks.items():
                self[(key, off)] = _Info(os.path.relpath(c.file, path), c.first_byte, c.length)


@dataclass(frozen=True)
class _Info:
    relative_path: str
    offset: int
    length: int


def plain_params(path: str, keys: Keys, d: Dims, layout: Layout, dtype: torch.dtype, vocab_padded: int | None,
                 device: torch.device | None = None, ahead=None) -> list[tuple[str, LazyParam]]:
    """This rank's parameters over the checkpoint, as ``megatron_dist.megatron_params`` gives them, mapped by this
    module instead of by megatron-core. ``ahead``: the checkpoint's readahead, told which chunks are read."""
    storage, direct = _Storage(keys.index, path), DirectReads(path, device)
    out = []
    for p in local_params(d, layout, vocab_padded):
        key, stacked = keys.keys[(p.rule_index, p.layer)]
        boxes, full = regions(p, key, stacked, layout, d.num_layers)
        saved = keys.index.shapes[key]
        if saved != full:
            raise ValueError(f"Megatron checkpoint {path} holds {key!r} as {list(saved)}, but the architecture of "
                             f"source.hf_config makes it {list(full)} (parameter {p.name}): the checkpoint does not "
                             f"fit the architecture of source.hf_config; point source.hf_config at the config of "
                             f"the model that was saved")
        items = [it for b in boxes for it in items_of(b, keys.index, path, p.name)]

        def load(plan: ParamPlan, p=p, items=items) -> list[torch.Tensor]:
            if ahead is not None:
                for it in items:
                    ahead.consumed(chunk_name(*it.storage_index))
            return pieces_of(plan, _read(path, p, items, storage, direct, dtype), d)
        out.append((p.name, LazyParam(tuple(p.shape), load, dtype)))
    return out


def _read(path: str, p: LocalParam, items: list[Item], storage: _Storage, direct: DirectReads,
          dtype: torch.dtype) -> torch.Tensor:
    """Parameter ``p`` from its reads, in ``dtype`` (the model's, as megatron-core loads it) on the reader's device;
    through torch's reader where a chunk cannot be located in place."""
    buf = torch.empty(tuple(p.shape), dtype=dtype, device=direct.device)

    def dest(item: Item) -> torch.Tensor:
        r = item.region
        view = buf.narrow(0, r.dest_row, r.shape[len(r.shape) - len(p.shape)]).view(r.shape)
        for dim, (off, n) in enumerate(zip(item.dest_offsets, item.lengths)):
            view = view.narrow(dim, off, n)
        return view
    if not read_items(direct, storage, items, dest):
        _read_with_torch(path, items, dest)
    return buf


def _read_with_torch(path: str, items: list[Item], dest) -> None:
    """The reads through torch.distributed.checkpoint's reader (chunks ``DirectReads`` cannot locate in place)."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    from megatron_fp8pb.sources.megatron_dist import _Reader, _RegionPlanner
    reads, regions = [], {}
    for it in items:
        r = it.region
        reads.append(ReadItem(LoadItemType.TENSOR, MetadataIndex(r.key, torch.Size(r.offset)),
                              torch.Size(it.dest_offsets), MetadataIndex(it.storage_index[0],
                                                                         torch.Size(it.storage_index[1])),
                              torch.Size(it.storage_offsets), torch.Size(it.lengths)))
        regions[(r.key, r.offset)] = dest(Item(it.storage_index, it.storage_offsets,
                                               tuple(0 for _ in r.shape), r.shape, r))
    metadata = FileSystemReader(path).read_metadata()
    load({}, storage_reader=_Reader(path, metadata), planner=_RegionPlanner(reads, regions), no_dist=True)
