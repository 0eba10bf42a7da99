"""Local Megatron parameters + an architecture table + the parallel layout -> the export plan of this rank.

Every local parameter must match exactly one rule (else an error naming it); every piece says which rows or columns
of which full HF tensor it holds. ``check_coverage`` runs on rank 0 over all ranks' pieces and fails closed: every HF
tensor the architecture needs is covered exactly once, and nothing else is produced.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from megatron_fp8pb.archs import arch, default_exclude, rules_for
from megatron_fp8pb.archs.base import (COLWISE, DUPLICATE, EXPERT, GATED, GLOBAL, LAYER, PARTS, QKV, REPLICATED,
                                       ROWWISE, TIED_COPY, VOCAB, Dims, Rule, hf_module, rule_layers)
from megatron_fp8pb.config import QuantConfig
from megatron_fp8pb.plan.write_order import WriteOrder, write_unit
from megatron_fp8pb.plan.fused_parts import local_groups, member_rows, member_segments

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_MTP_LAYER_RE = re.compile(r"^mtp\.layers\.(\d+)\.transformer_layer\.(.+)$")
_EXPERT_RES = (re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$"),
               re.compile(r"^mlp\.experts\.(linear_fc[12]\.weight)(\d+)$"))


@dataclass(frozen=True)
class Layout:
    """Where this rank sits. ``exporting``: this rank's copy is the one written (data-parallel rank 0)."""
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0
    etp_size: int = 1
    etp_rank: int = 0
    exporting: bool = True
    expert_exporting: bool = True

    def describe(self) -> str:
        return (f"tp={self.tp_size} pp={self.pp_size} ep={self.ep_size} etp={self.etp_size} "
                f"(tp_rank={self.tp_rank} pp_rank={self.pp_rank} ep_rank={self.ep_rank} etp_rank={self.etp_rank})")


@dataclass(frozen=True)
class Piece:
    """Rows (dim 0) or columns (dim 1) ``[offset, offset+length)`` of the full HF tensor ``hf_name``."""
    hf_name: str
    full_shape: tuple[int, ...]
    dim: int
    offset: int
    length: int
    quantize: bool
    axis: str | None        # "tp" / "etp": the group whose ranks share its 128-blocks; None: quantized whole
    order: WriteOrder       # global write order, the same for every layout
    src: int = 0            # global rank holding it (set on rank 0)
    linear: bool = False    # a linear layer's weight (listed in modules_to_not_convert when not quantized)
    scale_fmt: str = "amax"  # of a quantized piece: how its block scales are made (QuantConfig.scale_fmt)
    dtype: str | None = None  # written in this dtype when not quantized (None: the checkpoint's dtype)


@dataclass
class ParamPlan:
    mcore_name: str
    local_shape: tuple[int, ...]
    rule: Rule
    layer: int | None
    expert: int | None
    slices: list[Piece] = field(default_factory=list)   # every HF slice this rank's parameter holds
    pieces: list[Piece] = field(default_factory=list)   # the slices this rank exports

    @property
    def fusion(self) -> str:
        return self.rule.fusion


def _match(rules: list[Rule], rel: str, scope: str, layer: int | None, d: Dims) -> tuple[int, Rule] | None:
    hits = [(k, r) for k, r in enumerate(rules) if r.scope == scope and rel in r.mcore
            and (layer is None or layer in rule_layers(r, d))]
    return hits[0] if hits else None


# sharding kinds a Megatron module may report for each rule kind
_SEEN_AS = {COLWISE: COLWISE, ROWWISE: ROWWISE, REPLICATED: REPLICATED, VOCAB: COLWISE, TIED_COPY: COLWISE}


def effective_shard(rule: Rule, style: str | None, name: str, hf_names: list[str]) -> Rule:
    """The rule as the Megatron module builds it: ``style`` ("colwise" / "rowwise" / "replicated", read off the
    module owning the parameter, None when unknown) must be the rule's sharding or one of its ``alt_shard``."""
    if style is None or _SEEN_AS.get(rule.shard) == style:
        return rule
    if style in rule.alt_shard:
        return replace(rule, shard=style)
    raise ValueError(f"Megatron parameter {name!r} is {style} (its module's partitioning), but the architecture table "
                     f"maps it to {', '.join(hf_names) or 'a tied copy'} as {rule.shard}"
                     f"{' or ' + ', '.join(rule.alt_shard) if rule.alt_shard else ''}; the export would write wrong "
                     f"rows. Build the layer with the module the table expects, or fix the table")


def _fill(name: str, layer: int | None, expert: int | None) -> str:
    return name.replace("{i}", str(layer)).replace("{e}", str(expert))


def _shard_sizes(rule: Rule, d: Dims, shapes, size: int, name: str, layout: Layout) -> list[int]:
    """Per-rank length of each HF tensor along the sharded dim; refuses shapes the layout cannot split."""
    dim = 1 if rule.shard == ROWWISE else 0
    if rule.fusion == PARTS:
        g = local_groups(rule.parts, d, size, f"{name} under {layout.describe()}")
        return [g * member_rows(rule.parts, d, m) for m in range(len(rule.hf))]
    out = []
    for hf, shape in zip(rule.hf, shapes):
        n = shape[dim]
        if rule.fusion == QKV:
            # whole query groups per rank
            groups = d.num_query_groups
            if groups % size:
                raise ValueError(f"{name}: num_query_groups({groups}) % tp_size({size}) != 0 under {layout.describe()};"
                                 f" choose a tp that divides the number of key/value heads")
            out.append(n // size)
        elif n % size and rule.shard != VOCAB:
            raise ValueError(f"{name}: {hf} dim {dim} = {n} is not divisible by the {size}-way split "
                             f"({n} % {size} = {n % size}) under {layout.describe()}")
        else:
            out.append(-(-n // size))
    return out


@dataclass(frozen=True)
class PlanContext:
    """What every parameter of one rank is planned against, made once per rank (``make``): the architecture's
    rules and dims, this rank's layout, the quant choice (serve-target excludes resolved), local layer index ->
    global layer number, the experts each expert-parallel rank holds, whether a tied lm_head is written, and the
    dtypes the source stores its tensors in (HF name -> torch dtype name; where known) for rules ``as_stored``."""
    rules: tuple[Rule, ...]
    d: Dims
    layout: Layout
    quant: QuantConfig = QuantConfig()
    layer_of_local: dict[int, int] = field(default_factory=dict)
    num_local_experts: int = 0
    untie_lm_head: bool = False
    source_dtypes: dict = field(default_factory=dict)

    @classmethod
    def make(cls, d: Dims, layout: Layout, quant: QuantConfig = QuantConfig(), layer_of_local: dict | None = None,
             num_local_experts: int = 0, untie_lm_head: bool = False,
             source_dtypes: dict | None = None) -> "PlanContext":
        return cls(tuple(rules_for(d)), d, layout, quant, dict(layer_of_local or {}), num_local_experts,
                   untie_lm_head, dict(source_dtypes or {}))


def plan_param(mcore_name: str, local_shape: tuple[int, ...], ctx: PlanContext,
               style: str | None = None) -> ParamPlan:
    """One local Megatron parameter -> its pieces on this rank. Raises ValueError naming the parameter."""
    rules, d, layout, quant = ctx.rules, ctx.d, ctx.layout, ctx.quant
    layer_of_local, num_local_experts = ctx.layer_of_local, ctx.num_local_experts
    layer = expert = None
    m = _LAYER_RE.match(mcore_name)
    mtp = _MTP_LAYER_RE.match(mcore_name)
    if m or mtp:
        j, rel = int((m or mtp).group(1)), (m or mtp).group(2)
        if mtp:    # the decoder layer of multi-token-prediction layer j: HF layer num_layers + j
            layer = d.num_layers + j
        elif j not in layer_of_local:
            raise ValueError(f"{mcore_name}: local layer {j} has no global layer number on this stage")
        else:
            layer = layer_of_local[j]
        scope = LAYER
        for rx in _EXPERT_RES:
            em = rx.match(rel)
            if em:
                if rx is _EXPERT_RES[0]:
                    x, rest = int(em.group(1)), em.group(2)
                    rel = "mlp.experts.local_experts.{x}." + rest
                else:
                    rest, x = em.group(1), int(em.group(2))
                    rel = "mlp.experts." + rest + "{x}"
                if not 0 <= x < max(num_local_experts, 1):
                    raise ValueError(f"{mcore_name}: local expert {x} >= num_local_experts({num_local_experts})")
                expert = layout.ep_rank * num_local_experts + x
                scope = EXPERT
                break
    else:
        rel, scope = mcore_name, GLOBAL
    hit = _match(rules, rel, scope, layer, d)
    if hit is None and rel in ("mlp.experts.weight1", "mlp.experts.weight2"):
        raise ValueError(f"{mcore_name} (shape {tuple(local_shape)}): the legacy GroupedMLP packs all local experts "
                         f"into one tensor, which the export does not split; build the experts as SequentialMLP or "
                         f"TEGroupedMLP, or save a dist checkpoint and export it with source.kind=megatron (it "
                         f"loads into SequentialMLP)")
    if hit is None:
        raise ValueError(f"Megatron parameter {mcore_name!r} (shape {tuple(local_shape)}) matches no rule of "
                         f"architecture {d.model_type!r}; the export refuses to drop it. Check that the model and "
                         f"the HF config agree")
    k, rule = hit
    rule = effective_shard(rule, style, mcore_name, [_fill(h, layer, expert) for h in rule.hf])
    if ctx.untie_lm_head and rule.shard == VOCAB and rule.hf == ("model.embed_tokens.weight",):
        rule = Rule(rule.mcore, rule.hf + ("lm_head.weight",), lambda d: ((d.vocab, d.hidden),) * 2, VOCAB,
                    DUPLICATE, False, GLOBAL)
    plan = ParamPlan(mcore_name, tuple(local_shape), rule, layer, expert)
    defaults = default_exclude(d)
    if rule.shard == TIED_COPY:
        return plan
    is_expert = rule.scope == EXPERT
    size, rank = (layout.etp_size, layout.etp_rank) if is_expert else (layout.tp_size, layout.tp_rank)
    exporting = layout.expert_exporting if is_expert else layout.exporting
    shapes = rule.shapes(d)
    unit = write_unit(rules, k, layer, d)
    _check_local_shape(plan, shapes, size, d, layout)
    dim = 1 if rule.shard == ROWWISE else 0
    split = 1 if rule.shard == REPLICATED else size
    local_lens = _shard_sizes(rule, d, shapes, split, mcore_name, layout)
    if rule.shard == VOCAB:
        local_lens = [local_shape[0]] * len(rule.hf)
    for h, (hf, shape, n) in enumerate(zip(rule.hf, shapes, local_lens)):
        offset = min(rank * n, shape[dim]) if split > 1 else 0
        length = max(0, min(n, shape[dim] - offset))   # 0: a vocab shard made only of padding
        name = _fill(hf, layer, expert)
        dtype = ctx.source_dtypes.get(name, rule.dtype) if rule.as_stored else rule.dtype
        is_linear = rule.linear or (rule.fusion == DUPLICATE and h == 1)
        # q/k/v and gate/up are fused by servers: excluding one member keeps the whole group unquantized
        group = [hf_module(_fill(x, layer, expert)) for x in _fused_with(rule, h, d)]
        q = is_linear and len(shape) == 2 and all(quant.quantizes(m, defaults) for m in group)
        # a replicated piece is whole on the rank that exports it: quantized there, with no collective
        axis = ("etp" if is_expert else "tp") if q and split > 1 else None
        ranges = [(offset, length)]
        if rule.fusion == PARTS:
            ranges = merged_ranges(member_segments(rule.parts, d, h, split, rank if split > 1 else 0))
        for at, n_rows in ranges:
            plan.slices.append(Piece(name, tuple(shape), dim, at, n_rows, q, axis,
                                     WriteOrder(unit, k, -1 if expert is None else expert, h),
                                     linear=is_linear and len(shape) == 2,
                                     scale_fmt=quant.scale_fmt if q else "amax", dtype=dtype))
    # the first stage writes the embedding; a later stage's copy (multi-token prediction reads embeddings on the
    # last stage) is the same tensor
    copy = rule.hf[:1] == ("model.embed_tokens.weight",) and layout.pp_rank != 0
    if exporting and not (rule.shard == REPLICATED and rank != 0) and not copy:
        plan.pieces = list(plan.slices)
    return plan


def merged_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ascending (offset, length) row ranges with touching ones joined (on one rank, all of a tensor is one range)."""
    out: list[tuple[int, int]] = []
    for at, n in ranges:
        if out and out[-1][0] + out[-1][1] == at:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((at, n))
    return out


def _fused_with(rule: Rule, member: int, d: Dims) -> tuple[str, ...]:
    """The HF names of ``rule`` a server fuses with its ``member`` into one module (quantized all or none): every one
    of q/k/v and of gate/up; for fused parts, the members whose leaves share one of the architecture's fusion
    groups."""
    if rule.fusion in (QKV, GATED):
        return rule.hf
    if rule.fusion != PARTS:
        return (rule.hf[member],)
    leaf = hf_module(rule.hf[member]).rsplit(".", 1)[-1]
    groups = [g for g in arch(d.model_type).fusion if leaf in g]
    return tuple(x for x in rule.hf if any(hf_module(x).rsplit(".", 1)[-1] in g for g in groups)) or \
        (rule.hf[member],)


def local_shape(rule: Rule, d: Dims, shapes, size: int, name: str, layout: Layout) -> tuple[int, ...]:
    """The shape of a replicated, column- or row-parallel Megatron tensor on one of ``size`` ranks (``shapes``: the
    full HF shapes of ``rule``); refuses a split the shapes do not allow, naming ``name``."""
    if rule.shard == REPLICATED:
        return tuple(shapes[0])
    dim = 1 if rule.shard == ROWWISE else 0
    want = list(shapes[0])
    want[dim] = sum(_shard_sizes(rule, d, shapes, size, name, layout))
    return tuple(want)


def _check_local_shape(plan: ParamPlan, shapes, size: int, d: Dims, layout: Layout) -> None:
    rule, local = plan.rule, plan.local_shape
    if rule.shard == VOCAB:
        want_rest = tuple(shapes[0][1:])
        if tuple(local[1:]) != want_rest or local[0] * size < shapes[0][0]:
            raise ValueError(f"{plan.mcore_name}: local shape {local} cannot hold vocab {shapes[0][0]} x {want_rest} "
                             f"split {size} ways under {layout.describe()} (padded vocab must be >= real vocab)")
        return
    want = local_shape(rule, d, shapes, size, plan.mcore_name, layout)
    if tuple(local) != want:
        raise ValueError(f"{plan.mcore_name}: local shape {tuple(local)} != {tuple(want)} expected from the HF config "
                         f"({', '.join(_fill(h, plan.layer, plan.expert) for h in rule.hf)} full shapes {shapes}) "
                         f"under "
                         f"{layout.describe()}; the model and source.hf_config disagree")


def expected_tensors(rules: list[Rule], d: Dims, untie_lm_head: bool = False) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the architecture needs, with its full shape."""
    out: dict[str, tuple[int, ...]] = {}
    for r in rules:
        if r.shard == TIED_COPY:
            continue
        shapes = r.shapes(d)
        layers = rule_layers(r, d) if r.scope != GLOBAL else [None]
        experts = range(d.num_experts) if r.scope == EXPERT else [None]
        for i in layers:
            for e in experts:
                for hf, shape in zip(r.hf, shapes):
                    out[_fill(hf, i, e)] = tuple(shape)
    if untie_lm_head:
        out["lm_head.weight"] = (d.vocab, d.hidden)
    return out


def hf_units(rules: list[Rule], d: Dims) -> dict[str, int]:
    """Every HF tensor the architecture reads -> the write unit it is exported in (``write_unit``)."""
    out: dict[str, int] = {}
    for k, r in enumerate(rules):
        if r.shard == TIED_COPY:
            continue
        for i in (rule_layers(r, d) if r.scope != GLOBAL else [None]):
            unit = write_unit(rules, k, i, d)
            for e in (range(d.num_experts) if r.scope == EXPERT else [None]):
                out.update({_fill(hf, i, e): unit for hf in r.hf})
    return out


def linear_weights(rules: list[Rule], d: Dims, untie_lm_head: bool = False) -> dict[str, tuple[int, ...]]:
    """The HF weights of linear layers (the FP8 candidates), with full shapes."""
    linear = {_fill(h, i, e) for r in rules if r.linear for h in r.hf
              for i in (rule_layers(r, d) if r.scope != GLOBAL else [None])
              for e in (range(d.num_experts) if r.scope == EXPERT else [None])}
    if untie_lm_head:
        linear.add("lm_head.weight")
    return {n: s for n, s in expected_tensors(rules, d, untie_lm_head).items() if n in linear and len(s) == 2}


def as_stored_tensors(rules: list[Rule], d: Dims) -> list[str]:
    """The HF tensors of rules ``as_stored`` (written in the dtype their source stores them in)."""
    return [n for r in rules if r.as_stored for n in expected_tensors([r], d)]


def check_coverage(pieces: list[Piece], expected: dict[str, tuple[int, ...]]) -> dict[str, list[Piece]]:
    """All ranks' pieces -> pieces per HF name sorted by offset; raises unless each tensor is covered exactly once."""
    by_name: dict[str, list[Piece]] = {}
    for p in pieces:
        if p.length == 0:
            continue
        if p.hf_name not in expected:
            raise ValueError(f"HF tensor {p.hf_name!r} from rank {p.src} is not part of the architecture")
        by_name.setdefault(p.hf_name, []).append(p)
    missing = sorted(set(expected) - set(by_name))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"no rank holds HF tensor(s) {missing[:5]}{more}: the Megatron model lacks the parameters "
                         f"that produce them (a missing expert or layer?)")
    for name, tiles in by_name.items():
        tiles.sort(key=lambda p: p.offset)
        full = expected[name]
        if any(p.full_shape != full for p in tiles):
            raise ValueError(f"HF tensor {name!r}: pieces disagree on its full shape "
                             f"({[p.full_shape for p in tiles]} vs {full})")
        dims = {p.dim for p in tiles}
        at = 0
        for p in tiles:
            if len(dims) != 1 or p.offset != at:
                raise ValueError(f"HF tensor {name!r}: pieces {[(p.src, p.offset, p.length) for p in tiles]} do not "
                                 f"tile it exactly (gap or overlap at {at})")
            at += p.length
        if at != full[tiles[0].dim]:
            raise ValueError(f"HF tensor {name!r}: pieces cover {at} of {full[tiles[0].dim]} along dim "
                             f"{tiles[0].dim}")
    return by_name
