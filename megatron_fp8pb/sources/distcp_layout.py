"""Where a Megatron distributed checkpoint's saved chunks lie in its files, read from its ``.metadata`` without torch.

The readahead starts before torch is imported, and a torch_dist checkpoint's data files hold its chunks by size (the
writer bins the largest first), so one layer's tensors are spread over the whole of each file, with its norms at the
end: read file by file, no layer is complete before the last bytes arrive. The chunks' places are in ``.metadata``, a
pickle of torch.distributed.checkpoint's dataclasses. ``saved_chunks`` reads it with an unpickler that builds plain
stand-ins for every class it names (nothing is imported or run), so the readahead can read chunk by chunk in the
order the export takes layers. Anything unexpected gives None: the readahead then reads whole files, as a hint only.
"""
from __future__ import annotations

import functools
import json
import os
import pickle
import re
from pathlib import Path
from typing import NamedTuple


class SavedChunk(NamedTuple):
    """One saved chunk of a checkpoint key: its offset in the key's global tensor and its bytes in a data file."""
    key: str
    offset: tuple[int, ...]
    file: Path
    first_byte: int
    length: int

    @property
    def name(self) -> str:
        """The chunk's name for the readahead (``chunk_name``)."""
        return chunk_name(self.key, self.offset)


def chunk_name(key: str, offset) -> str:
    return f"{key}@{','.join(str(int(o)) for o in offset)}"


class _Stub:
    """What a class of the pickle unpickles to: its constructor arguments and its state, as attributes."""

    def __init__(self, *args, **kwargs):
        self.args = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            for part in state:      # (__dict__, __slots__ values)
                self.__dict__.update(part or {})
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


_STUBS: dict[tuple[str, str], type] = {}
_PLAIN = {("torch", "Size"): tuple, ("collections", "OrderedDict"): dict, ("builtins", "set"): set,
          ("builtins", "frozenset"): frozenset, ("builtins", "tuple"): tuple, ("builtins", "list"): list,
          ("builtins", "dict"): dict}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _PLAIN:
            return _PLAIN[(module, name)]
        if (module, name) == ("copyreg", "_reconstructor"):
            return lambda cls, base, state: cls.__new__(cls)
        return _STUBS.setdefault((module, name), type(name, (_Stub,), {"__module__": "stub." + module}))


class SavedIndex(NamedTuple):
    """What ``.metadata`` says of a checkpoint's tensors: each key's global shape and its saved chunks (offset ->
    ``(sizes, SavedChunk)``), and whether any chunk is stored transformed (compressed: not readable in place)."""
    shapes: dict[str, tuple[int, ...]]
    chunks: dict[str, dict[tuple[int, ...], tuple[tuple[int, ...], SavedChunk]]]
    transformed: bool


def _metadata(path: Path):
    """``.metadata`` unpickled into stand-ins, read once while the file stays the same (the readahead and the
    export's reader both ask)."""
    st = os.stat(path / ".metadata")
    return _load(str(path / ".metadata"), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _load(file: str, *stamp):
    with open(file, "rb") as f:
        return _Unpickler(f).load()


def _storage_chunks(md, path: Path) -> dict[tuple[str, tuple[int, ...]], SavedChunk]:
    """(key, offset) -> the saved chunk, for every item of the checkpoint's storage."""
    out = {}
    for index, info in md.storage_data.items():
        offset = tuple(int(o) for o in (getattr(index, "offset", None) or ()))
        out[(str(index.fqn), offset)] = SavedChunk(str(index.fqn), offset, path / str(info.relative_path),
                                                   int(info.offset), int(info.length))
    return out


def saved_index(path: str | Path) -> SavedIndex | None:
    """The tensors of the checkpoint at ``path`` as ``.metadata`` lists them; None where it cannot be read this way."""
    path = Path(path)
    try:
        md = _metadata(path)
        where = _storage_chunks(md, path)
        transformed = any(getattr(info, "transform_descriptors", None) for info in md.storage_data.values())
        shapes, chunks = {}, {}
        for key, meta in md.state_dict_metadata.items():
            if not hasattr(meta, "size"):       # bytes (optimizer step counts, rng states, ...)
                continue
            shapes[str(key)] = tuple(int(s) for s in meta.size)
            chunks[str(key)] = {}
            for c in meta.chunks:
                offset = tuple(int(o) for o in c.offsets)
                chunks[str(key)][offset] = (tuple(int(s) for s in c.sizes), where[(str(key), offset)])
        return SavedIndex(shapes, chunks, transformed)
    except Exception:       # a hint only: any surprise means the caller reads it another way
        return None


def saved_chunks(path: str | Path) -> list[SavedChunk] | None:
    """Every saved tensor chunk of the checkpoint at ``path`` with its bytes, in no order; None where ``.metadata``
    cannot be read this way (the caller falls back to reading whole files)."""
    path = Path(path)
    try:
        return list(_storage_chunks(_metadata(path), path).values())
    except Exception:       # a hint only: any surprise means whole files
        return None


_NUMBERED = re.compile(r"^(decoder|mtp)\.layers\.(\d+)\.")


def chunk_layer(key: str, offset: tuple[int, ...], num_layers: int) -> tuple[int, int] | None:
    """(global layer, the axis after its prepended ones) of a chunk of a layer's key: decoder layer ``i`` or
    multi-token-prediction layer ``num_layers + k``, from the key's number (non-homogeneous layers, MTP) or from
    the layer axis Megatron prepends to the key of stacked layers; None for a key of no layer."""
    m = _NUMBERED.match(key)
    if m:
        return int(m.group(2)) + (num_layers if m.group(1) == "mtp" else 0), 0
    if key.startswith(("decoder.layers.", "mtp.layers.")) and offset:
        return offset[0] + (num_layers if key.startswith("mtp.") else 0), 1
    return None


_EXPERT_NUMBER = re.compile(r"\.experts\.experts\.(\d+)\.")


def chunk_expert(key: str, offset: tuple[int, ...], axis: int) -> int | None:
    """The routed expert a chunk of a layer's key belongs to (``axis``: the first after the layer's prepended axes,
    from ``chunk_layer``): its number in the key (experts saved one tensor each) or its offset on the expert axis
    Megatron prepends; None for a key of no routed expert."""
    if ".experts." not in key or ".shared_experts." in key:
        return None
    m = _EXPERT_NUMBER.search(key)
    if m:
        return int(m.group(1))
    return offset[axis] if len(offset) > axis else None


def check_torch_dist(path: str) -> None:
    """``path`` is a Megatron distributed checkpoint in the torch_dist format; an error naming the fix otherwise."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"source.path {path} is not a Megatron distributed checkpoint directory")
    try:
        with open(os.path.join(path, "metadata.json")) as f:
            backend = json.load(f).get("sharded_backend")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}/metadata.json is missing or unreadable ({e}): source.path must be a Megatron "
                         f"distributed checkpoint directory (one iteration's folder, e.g. iter_0001000)") from e
    if backend != "torch_dist":
        raise ValueError(f"Megatron checkpoint {path} is in the {backend!r} format; the export reads 'torch_dist' "
                         f"(megatron-core's default): convert it with megatron-core's checkpoint converter first")


def vocab_rows_of(shapes: dict, path: str, tp_size: int, vocab: int) -> int | None:
    """The padded vocabulary a checkpoint was saved with (the global rows of its embedding, or of its output layer;
    ``shapes``: key -> global shape), which the export layout must reuse to read it; None when it holds neither."""
    shape = shapes.get("embedding.word_embeddings.weight") or shapes.get("output_layer.weight")
    if shape is None:
        return None
    rows = int(shape[0])
    if rows % tp_size:
        raise ValueError(f"Megatron checkpoint {path} has a padded vocabulary of {rows} rows, which tp({tp_size}) "
                         f"does not divide ({rows} % {tp_size} = {rows % tp_size}); choose a tp that divides it")
    if rows < vocab:
        raise ValueError(f"Megatron checkpoint {path} has {rows} vocabulary rows but source.hf_config says "
                         f"vocab_size={vocab}; the config describes another model")
    return rows
