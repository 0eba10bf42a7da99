"""The global write order: which unit (the embedding, each layer, the final norm and lm_head) each HF tensor is
exported in, and the order units are streamed in; the same for every parallel layout."""
from __future__ import annotations

from typing import NamedTuple

from megatron_fp8pb.archs.base import GLOBAL, Dims, Rule


class WriteOrder(NamedTuple):
    """Where a piece comes in the global write order, the same for every layout; compares as the tuple of its
    fields. ``unit``: the embedding, each layer, then the final norm + lm_head (``write_unit``); ``rule``: the
    architecture table's index; ``expert``: global expert number (-1: not an expert); ``member``: which of the
    rule's HF tensors (q/k/v, gate/up)."""
    unit: int
    rule: int
    expert: int
    member: int


EMBEDDING_UNIT = 0      # the write unit of the global tensors listed before the first layer rule (embedding)


def final_unit(d: Dims) -> int:
    """The write unit of the global tensors after the layers (final norm, lm_head): after every decoder and
    multi-token-prediction layer."""
    return d.num_layers + d.mtp_layers + 1


def streamed_unit_order(d: Dims) -> list[int]:
    """The order a source streamed from disk is read and exported in, the same on every rank (``unit_sequence``)."""
    return unit_sequence(final_unit(d))


def unit_sequence(last: int) -> list[int]:
    """Units 0..``last`` in streamed order: the embedding, the first layer, then the final norm and lm_head (unit
    ``last``), then the other layers. The export's last unit is read and then written with nothing left to overlap
    either; ending on a layer rather than on lm_head (a vocabulary's rows) keeps that tail short, and with lm_head
    after a layer the two vocabulary-sized units are never read ahead together. The files are the same in any order
    (each tensor has its place in them)."""
    return [EMBEDDING_UNIT, *range(1, min(2, last)), last, *range(2, last)]


def write_unit(rules: list[Rule], k: int, layer: int | None, d: Dims) -> int:
    """Write unit of rule ``k``: global layer i is unit 1 + i; a global rule is the embedding unit when the table lists
    it before the first layer rule, else the final unit."""
    if layer is not None:
        return 1 + layer
    first_layer_rule = min((j for j, r in enumerate(rules) if r.scope != GLOBAL), default=len(rules))
    return EMBEDDING_UNIT if k < first_layer_rule else final_unit(d)
