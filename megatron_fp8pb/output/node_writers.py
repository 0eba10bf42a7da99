"""Where assembled tensors are written: by rank 0 (``output.writers=rank0``), or by one writer per node
(``output.writers=node``), so that a large export is not limited by one node's disk and network.

With one writer per node, every node's first rank (its lowest global rank: torchrun's local rank 0) writes the
tensors its node's ranks produce into the same shard files, at the offsets of the one shard plan, so the files are
byte-identical to the single-writer export:

1. rank 0 plans the shards, creates ``<out>.partial`` and preallocates every file (headers written) for all writers;
2. every rank learns where its pieces go (a scatter); the other writers open the files and check their headers;
3. pieces travel to their tensor's writer, which assembles and writes its tensors (``pipeline._transfer``);
4. every writer waits for its writes and fsyncs; every rank learns whether any writer failed (``collectives.agree``);
5. rank 0 writes config.json and the index, fsyncs, and renames the directory into place.

A tensor is written by the node of the lowest rank holding a piece of it, so a tensor-parallel gather stays inside
a node when the TP group does. Nodes are told apart by torchrun's ``GROUP_RANK`` (the hostname without torchrun).
One node: as ``rank0``. A writer's failure stops its writing, is raised once every writer has finished its share,
and removes the partial directory: the output appears only when complete.
"""
from __future__ import annotations

import os
import socket

from megatron_fp8pb.parallel import collectives as coll
from megatron_fp8pb.parallel.collectives import agree
from megatron_fp8pb.faults import ExportError
from megatron_fp8pb.quant.format import FORMAT
from megatron_fp8pb.output.writer import BackgroundWriter, CheckpointWriter



def node_of_this_rank() -> str:
    """This process's node, from torchrun's environment (its agent's GROUP_RANK), else the hostname."""
    node = os.environ.get("GROUP_RANK")
    return f"node {node}" if node is not None else socket.gethostname()


def writer_ranks(nodes: list[str]) -> list[int]:
    """The node of each global rank -> the writer of each rank: the lowest global rank of its node (torchrun's local
    rank 0). So a writer's rank is never above the ranks it writes for, and every piece travels to a lower (or the
    same) rank: no two ranks send to each other, which ordered point-to-point channels (NCCL) need."""
    first: dict[str, int] = {}
    for r, node in enumerate(nodes):
        first.setdefault(node, r)
    return [first[node] for node in nodes]


def owners(by_name: dict[str, list], writer_of: list[int]) -> dict[str, int]:
    """HF tensor name -> the rank that writes it: the writer of the lowest rank holding a piece of it."""
    return {name: writer_of[min(p.src for p in tiles)] for name, tiles in by_name.items()}


def file_names(name: str, tiles: list) -> list[str]:
    """The names a tensor is written under: the tensor, and its scale when quantized."""
    return [name, FORMAT.scale_name(name)] if tiles[0].quantize else [name]


class Routes:
    """This rank's part in the writing: where its pieces go (``dest``), whether it writes (``writer``)."""

    def __init__(self, me: int = 0, writer_of: list[int] | None = None):
        self.me = me
        self.writer_of = writer_of or [0]
        self.node = len(set(self.writer_of)) > 1     # several writers
        self.writer = me in self.writer_of
        self.dest: dict[str, int] = {}     # HF name -> writer, for this rank's pieces (node mode)
        self.owner: dict[str, int] = {}    # rank 0: every tensor's writer (node mode)
        self.written: dict[int, int] = {}  # rank 0: bytes written by each other writer, once flushed
        self.specs: list = []              # rank 0: the whole write plan, for the other writers
        self.scope = "rank 0's node" if self.node else ""

    @classmethod
    def start(cls, writers: str) -> "Routes":
        """Collective with ``writers="node"``: every rank's node."""
        me = coll.rank()
        if writers != "node" or coll.world_size() == 1:
            return cls(me)
        return cls(me, writer_ranks(coll.all_gather_objects(node_of_this_rank())))

    def open(self, by_name: dict, specs: list, out_dir, options) -> BackgroundWriter:
        """Rank 0: create the partial directory and every file of the plan; it writes the tensors it owns."""
        mine = None
        if self.node:
            self.owner = owners(by_name, self.writer_of)
            mine = {n for name, tiles in by_name.items() if self.owner[name] == 0 for n in file_names(name, tiles)}
        self.specs = specs
        return BackgroundWriter(CheckpointWriter(out_dir, specs, options.max_shard_size, options.overwrite, mine=mine),
                                defer_errors=self.node)

    def share(self, by_name: dict, writer, out_dir, options) -> tuple[dict, object]:
        """Collective (node mode): each rank learns where its pieces go; the other writers get their tensors and open
        the files rank 0 made. Returns this rank's (tensors to assemble, writer)."""
        if not self.node:
            return by_name, writer
        parts = None
        if self.me == 0:
            parts = [({}, None) for _ in self.writer_of]
            for name, tiles in by_name.items():
                for p in tiles:
                    parts[p.src][0][name] = self.owner[name]
            for w in set(self.writer_of) - {0}:
                parts[w] = (parts[w][0], ({n: t for n, t in by_name.items() if self.owner[n] == w}, self.specs))
        self.dest, assigned = coll.scatter_objects(parts)
        error = None
        if self.me != 0 and assigned is not None:
            by_name, specs = assigned
            mine = {n for name, tiles in by_name.items() for n in file_names(name, tiles)}
            try:
                writer = BackgroundWriter(CheckpointWriter(out_dir, specs, options.max_shard_size, mine=mine,
                                                           create=False), self.me, defer_errors=True)
            except (OSError, ValueError, KeyError) as e:
                error = f"rank {self.me}, stage write: {e}"
        if self.me == 0:
            by_name = {n: t for n, t in by_name.items() if self.owner[n] == 0}
        try:
            agree(error)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        return by_name, writer

    def send(self, items: list, payloads: list, traffic, device) -> list:
        """Send this rank's pieces that another rank writes: to rank 0 one at a time (one writer), else started
        together (a writer also receives, so its sends must not wait for their receiver); returns what to wait for."""
        pending = []
        for (p, _), payload in zip(items, payloads):
            dst = self.dest.get(p.hf_name, 0)
            if not p.length or dst == self.me:
                continue
            for t in payload:
                if self.node:
                    pending.append(coll.isend_tensor(t, dst, traffic, device))
                else:
                    coll.send_tensor(t, dst, traffic, device)
        return pending

    @staticmethod
    def wait(pending: list) -> None:
        coll.wait_sends(pending)

    def write_total(self, writer) -> int:
        """The bytes this rank's writer writes (the progress line's total)."""
        if writer is None:
            return 0
        if self.node:
            return writer.writer.planned_bytes
        return sum(s.nbytes for s in writer.writer.specs.values())

    def flush(self, writer) -> None:
        """Collective (node mode): the writers other than rank 0 wait for their writes (fsynced); every rank learns
        whether one failed. Rank 0 keeps each writer's byte count (``written``)."""
        if not self.node:
            return
        error = None
        if self.me != 0 and writer is not None:
            try:
                writer.flush()
            except (ExportError, OSError, RuntimeError) as e:
                error = str(e) if str(e).startswith("rank ") else f"rank {self.me}, stage write: {e}"
        counts = coll.gather_objects(writer.bytes_written if writer is not None and self.me != 0 else 0)
        if counts is not None:
            self.written = {r: counts[r] for r in sorted(set(self.writer_of) - {0})}
        agree(error)

    def bytes_by_writer(self, writer) -> dict[int, int]:
        """Rank 0, after its writer finished: bytes written by each writer rank."""
        return {0: writer.bytes_written, **self.written}
