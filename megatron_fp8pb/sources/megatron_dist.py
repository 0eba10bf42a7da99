"""A Megatron distributed checkpoint (torch_dist format) streamed unit by unit: no model is loaded.

What each local parameter is in the checkpoint (its key, global shape, offset, the layer axis Megatron prepends, the
[gate; up] split of a gated fc1, the expert axes, the key renames of the local layer spec) comes from megatron-core
itself: a GPTModel of the export layout built on the meta device (no memory) gives its ``sharded_state_dict()``. The
reads are planned with torch.distributed.checkpoint's own planning, one parameter at a time and on this rank alone
(no collective, so the export's reader thread can run them): only the saved chunks that overlap this rank's slice
are read, whatever tp/pp/ep the checkpoint was saved at, with positioned reads where a chunk's bytes can be located
(``distcp_items``, on a GPU straight into device memory) and with torch's reader otherwise.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_fp8pb.parallel import megatron as mcore
from megatron_fp8pb.archs import Dims
from megatron_fp8pb.sources.distcp import DirectReads, read_items
from megatron_fp8pb.sources.distcp_layout import check_torch_dist, chunk_name, vocab_rows_of
from megatron_fp8pb.sources.readahead import Readahead
from megatron_fp8pb.plan.params import Layout, ParamPlan
from megatron_fp8pb.sources.streamed import LazyParam, local_param_shapes
from megatron_fp8pb.plan.tp_slices import pieces_of


def read_checkpoint_metadata(path: str) -> Metadata:
    """The torch.distributed.checkpoint metadata of a Megatron torch_dist checkpoint (every saved chunk's place)."""
    check_torch_dist(path)
    return FileSystemReader(path).read_metadata()


def padded_vocab_rows(metadata: Metadata, path: str, tp_size: int, vocab: int) -> int | None:
    """The padded vocabulary the checkpoint was saved with (``distcp_layout.vocab_rows_of``)."""
    shapes = {k: tuple(m.size) for k, m in metadata.state_dict_metadata.items()
              if isinstance(m, TensorStorageMetadata)}
    return vocab_rows_of(shapes, path, tp_size, vocab)


class _Reader(FileSystemReader):
    """A FileSystemReader that reuses metadata read once (every parameter's read would otherwise re-read it)."""

    def __init__(self, path: str, metadata: Metadata):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return self._metadata


class _RegionPlanner(LoadPlanner):
    """Runs reads planned beforehand (``items``, from ``plan_reads``) into ``regions``: (checkpoint key, offsets of
    the region in the global tensor) -> the buffer, shaped as the region."""

    def __init__(self, items: list[ReadItem], regions: dict[tuple[str, tuple[int, ...]], torch.Tensor]):
        self.items, self.regions = items, regions

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False, *args, **kwargs) -> None:
        pass

    def create_local_plan(self) -> LoadPlan:
        return LoadPlan(list(self.items))

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value) -> None:
        raise AssertionError(f"unexpected non-tensor read of {read_item.dest_index.fqn}")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        buf = self.regions[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (off, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            buf = buf.narrow(dim, off, n)
        return buf

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


def _sharded_tensors(obj) -> list:
    """The ShardedTensors of a nested dict / list (what a factory builds), in order."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    if isinstance(obj, ShardedTensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _sharded_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _sharded_tensors(v)]
    return []


def _with_data(obj):
    """The nested structure with every ShardedTensor replaced by its (loaded) data and every local object unwrapped:
    what a factory's merge takes."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedTensor
    if isinstance(obj, ShardedTensor):
        return obj.data
    if isinstance(obj, LocalNonpersistentObject):
        return obj.unwrap()
    if isinstance(obj, dict):
        return {k: _with_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_with_data(v) for v in obj)
    return obj


def _region(st) -> tuple[tuple[int, ...], torch.Tensor]:
    """A ShardedTensor -> (its offsets in the global tensor, its data viewed with the prepended axes as size 1)."""
    return tuple(st.global_offset), st.data.view((1,) * st.prepend_axis_num + tuple(st.local_shape))


def _built(spec):
    """A parameter's entry of a sharded_state_dict -> what is saved: the ShardedTensor, or what its factory builds."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    return spec.build() if isinstance(spec, ShardedTensorFactory) else spec


def read_sharded(path: str, metadata: Metadata, spec, items: list[ReadItem],
                 direct: DirectReads | None = None) -> torch.Tensor:
    """One local parameter from the checkpoint: ``spec`` is its entry of the meta model's sharded_state_dict (a
    ShardedTensor, or a ShardedTensorFactory such as the gated fc1's), ``items`` its reads (``plan_reads``) -> the
    tensor Megatron would hold. ``direct``: the checkpoint's positioned reads (the tensor is made on its device);
    chunks it cannot locate are read with torch.distributed.checkpoint's reader."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.api import CheckpointException
    device = direct.device if direct is not None else None
    buf = torch.empty(tuple(spec.data.shape), dtype=spec.data.dtype, device=device)
    built = _built(replace(spec, data=buf))
    regions = {}
    for st in _sharded_tensors(built):
        off, region = _region(st)
        regions[(st.key, off)] = region
    planner = _RegionPlanner(items, regions)
    if direct is None or not read_items(direct, metadata.storage_data, items, planner.resolve_tensor):
        try:
            load({}, storage_reader=_Reader(path, metadata), planner=planner, no_dist=True)
        except CheckpointException as e:   # what failed on this rank, as torch.distributed.checkpoint wraps it
            cause = next(iter(e.failures.values()))[0] if e.failures else e
            raise ValueError(f"Megatron checkpoint {path}: reading {sorted({k for k, _ in regions})} failed: "
                             f"{type(cause).__name__}: {cause}") from cause
    return spec.merge_fn(_with_data(built)) if isinstance(spec, ShardedTensorFactory) else buf


def sharded_specs(d: Dims, dtype: torch.dtype, layout: Layout, vocab_rows: int | None,
                  content_metadata: dict | None = None) -> dict:
    """Local parameter name -> its ShardedTensor / ShardedTensorFactory, from a GPTModel of this layout built on the
    meta device (megatron-core's parallel state must be initialized). ``content_metadata``: the checkpoint's (how
    its state dict was laid out)."""
    with torch.device("meta"):
        model = mcore.build_gpt(d, dtype, layout, vocab_rows=vocab_rows)
    specs = model.sharded_state_dict(metadata=content_metadata)
    return {name: spec for name, spec in specs.items() if not name.endswith("_extra_state")}


def plan_reads(path: str, metadata: Metadata, specs: dict, names: list[str]) -> dict[str, list[ReadItem]]:
    """Parameter name -> the reads of saved chunks that fill it, planned once per checkpoint key for all of this
    rank's parameters. Every parameter must be in the checkpoint with the global shape this layout expects, and the
    saved chunks must cover this rank's region of it."""
    saved = metadata.state_dict_metadata
    wanted: dict[str, list[tuple[str, tuple[int, ...], torch.Tensor]]] = {}
    for name in names:
        for st in _sharded_tensors(_built(specs[name])):
            md = saved.get(st.key)
            if not isinstance(md, TensorStorageMetadata):
                raise ValueError(f"Megatron checkpoint {path} has no tensor {st.key!r} (parameter {name}): it does "
                                 f"not fit the architecture of source.hf_config; point source.hf_config at the "
                                 f"config of the model that was saved")
            if tuple(md.size) != tuple(st.global_shape):
                raise ValueError(f"Megatron checkpoint {path} holds {st.key!r} as {list(md.size)}, but the "
                                 f"architecture of source.hf_config makes it {list(st.global_shape)} (parameter "
                                 f"{name}): the checkpoint does not fit the architecture of source.hf_config; point "
                                 f"source.hf_config at the config of the model that was saved")
            wanted.setdefault(st.key, []).append((name, *_region(st)))
    out: dict[str, list[ReadItem]] = {name: [] for name in names}
    for key, regions in wanted.items():
        chunks = [ChunkStorageMetadata(offsets=torch.Size(off), sizes=torch.Size(r.shape)) for _, off, r in regions]
        covered = [0] * len(regions)
        for item in create_read_items_for_chunk_list(key, saved[key], chunks):
            k = item.dest_index.index
            out[regions[k][0]].append(item)
            covered[k] += math.prod(item.lengths)
        for (name, off, region), n in zip(regions, covered):
            if n != region.numel():
                raise ValueError(f"Megatron checkpoint {path}: the saved chunks of {key!r} cover {n} of the "
                                 f"{region.numel()} elements at offset {list(off)} size {list(region.shape)} "
                                 f"(parameter {name}); the checkpoint is incomplete (an interrupted save?)")
    return out


def megatron_params(path: str, metadata: Metadata, d: Dims, layout: Layout, dtype: torch.dtype,
                    vocab_rows: int | None, device: torch.device | None = None,
                    ahead: Readahead | None = None) -> list[tuple[str, LazyParam]]:
    """This rank's parameters over a Megatron dist checkpoint (``metadata``: its ``read_checkpoint_metadata``), each
    read when its unit comes: the local tensor this layout's model would load (``vocab_rows``: the checkpoint's
    padded vocabulary), split into the pieces it exports; read into ``device`` memory where one is given.
    ``ahead``: the checkpoint's readahead (``readahead.start_checkpoint``), told which chunks are read."""
    specs = sharded_specs(d, dtype, layout, vocab_rows, mcore.checkpoint_content_metadata(path))
    shapes = local_param_shapes(d, layout, vocab_rows)
    missing = [name for name, _ in shapes if name not in specs]
    if missing:
        raise ValueError(f"the Megatron model of source.hf_config has no parameters {missing[:5]} that the export "
                         f"rules read; the architecture's Megatron names and its rules disagree")
    reads = plan_reads(path, metadata, specs, [name for name, _ in shapes])
    direct = DirectReads(path, device)
    out = []
    for name, shape in shapes:
        spec = specs[name]
        if tuple(spec.data.shape) != tuple(shape):
            raise ValueError(f"Megatron parameter {name} is {list(spec.data.shape)} in the model of "
                             f"source.hf_config but the export rules expect {list(shape)} at {layout.describe()}")

        def load(plan: ParamPlan, spec=spec, items=reads[name]) -> list[torch.Tensor]:
            if ahead is not None:
                for item in items:
                    ahead.consumed(chunk_name(item.storage_index.fqn, item.storage_index.offset or ()))
            return pieces_of(plan, read_sharded(path, metadata, spec, items, direct), d)
        out.append((name, LazyParam(tuple(shape), load, spec.data.dtype)))
    return out
