"""The source kinds, one row each: what the kind reads, what it needs, and how the export treats it (torch-free).

A new kind is a row here plus its reading code in ``sources/`` and its branch in ``registry.build_source``; the
config's choices, ``--help``, the path checks, the readahead and the choice of importing megatron-core read this table.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceKind:
    """One kind of source."""
    name: str
    help: str                     # what it is, for --help
    path_is: str | None = None    # what source.path must point at (None: the kind reads no path)
    needs_megatron: bool = False  # the export imports megatron-core for it
    streamed: bool = False        # read unit by unit while the export runs (no Megatron model built)
    readahead: str | None = None  # "tensors": this rank's tensors along the read plan; "chunks": this rank's saved
                                  # chunks in the export's order


KINDS = {k.name: k for k in (
    SourceKind("tiny", "the embedded small model", streamed=True),
    SourceKind("hf", "an HF safetensors checkpoint", path_is="an HF checkpoint directory", streamed=True,
               readahead="tensors"),
    SourceKind("megatron", "a Megatron distributed checkpoint (torch_dist), with source.hf_config",
               path_is="a Megatron distributed checkpoint directory", needs_megatron=True, streamed=True,
               readahead="chunks"),
    SourceKind("random", "a preset's shapes with random weights, for benchmarks", needs_megatron=True),
)}


def kind(name: str) -> SourceKind:
    """The row of ``name``; ValueError naming the choices."""
    if name not in KINDS:
        raise ValueError(f"config key source.kind={name!r}: choose one of {', '.join(KINDS)}")
    return KINDS[name]
