"""Where a block-FP8 checkpoint can be served: the partition rules of vLLM / SGLang and transformers' dims rule.

Pure functions over ``modules``: HF module name (no ``.weight``) -> full weight shape ``(N, K)`` (out, in) of the
quantized linears. FORMAT.md, "Serving-side constraint": at tensor parallel size T the per-rank output of a
column-parallel linear (q, k, v, gate, up, each separately) must be a multiple of the 128 block, and for T > 1 the
per-rank input of a row-parallel linear (o_proj, down_proj) too.

vLLM / SGLang replicate k/v heads when T >= num_key_value_heads (each rank then holds one whole head); pass
``num_kv_heads`` to apply that rule, leave it None for the plain N/T rule of FORMAT.md.
vLLM / SGLang also fuse q/k/v, gate/up and all experts of a layer into one module each, and refuse one whose parts
are partly quantized: ``layers_to_keep_unquantized`` returns whole fusion groups.

Some linears the servers build without the checkpoint's quantization at every tp (``NEVER_FP8``): routers
(``gate``), the shared expert's sigmoid gate, gated DeltaNet's b/a projections (``in_proj_ba``, ``in_proj_b``,
``in_proj_a``: a few value heads per rank, never a whole 128-row block) and the indexer's ``weights_proj`` (vLLM
fuses it with ``wk`` into one bf16 weight); an FP8 one is a ``never_fp8`` problem. The shared expert's per-rank size
at tp=8 follows the gate/up/down rules (Qwen3-Next's 512 gives 64 rows per rank and is refused).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from megatron_fp8pb import archs
from megatron_fp8pb.quant.format import FORMAT

BLOCK = FORMAT.block
_EXPERT_W = {x: archs.serving_styles()[x] for x in archs.expert_only_leaves()}
COLUMN_PARALLEL = tuple(x for x in archs.leaves_with_style("column") if x not in _EXPERT_W)
ROW_PARALLEL = tuple(x for x in archs.leaves_with_style("row") if x not in _EXPERT_W)
_KV = archs.kv_leaves()
NEVER_FP8 = archs.never_quantized_leaves()
_EXPERT_RE = re.compile(r"^(?P<group>.+\.experts)\.\d+\.(?P<leaf>[^.]+)$")


@dataclass(frozen=True)
class Problem:
    """One quantized module that a loader refuses. ``tp`` is None for TP-independent rules."""
    module: str
    tp: int | None
    rule: str   # "output_partition" | "input_partition" | "tp_split" | "transformers_dims" | "fused_partial" |
    #             "never_fp8" | "norm_split"
    message: str

    def __str__(self) -> str:
        where = f" at tp={self.tp}" if self.tp is not None else ""
        return f"{self.module}{where}: {self.message}"

    def to_json(self) -> dict:
        return asdict(self)


def leaf(module: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``q_proj``."""
    return module.rsplit(".", 1)[-1]


def parallel_style(module: str) -> str | None:
    """"column", "row", or None (no serving rule: lm_head, routers, anything else).

    Mixtral-style expert names count too: ``experts.{e}.w1`` / ``w3`` column, ``experts.{e}.w2`` row.
    """
    name = leaf(module)
    if name in COLUMN_PARALLEL:
        return "column"
    if name in ROW_PARALLEL:
        return "row"
    if _EXPERT_RE.match(module) and name in _EXPERT_W:
        return _EXPERT_W[name]
    return None


def _column_partition(module: str, n: int, tp: int, num_kv_heads: int | None) -> tuple[int | None, str]:
    """Per-rank output rows of a column-parallel module at ``tp``: (size, arithmetic), or (None, why not)."""
    if num_kv_heads and leaf(module) in _KV and tp >= num_kv_heads:
        if tp % num_kv_heads:
            return None, (f"tp {tp} is not a multiple of num_key_value_heads {num_kv_heads} (the server replicates "
                          f"whole kv heads)")
        head_dim = n // num_kv_heads
        return head_dim, f"{n}/{num_kv_heads} kv heads = {head_dim} (one replicated head per rank)"
    if n % tp:
        return None, f"output_size {n} is not divisible by tp {tp}"
    return n // tp, f"{n}/{tp} = {n // tp}"


def _column_problem(module: str, n: int, tp: int, block: int, num_kv_heads: int | None) -> Problem | None:
    size, arith = _column_partition(module, n, tp, num_kv_heads)
    if size is None:
        return Problem(module, tp, "tp_split", arith)
    if size % block:
        return Problem(module, tp, "output_partition",
                       f"output_partition_size {arith} is not divisible by block_n {block}")
    return None


def _row_problem(module: str, k: int, tp: int, block: int) -> Problem | None:
    if tp == 1:
        return None
    if k % tp:
        return Problem(module, tp, "tp_split", f"input_size {k} is not divisible by tp {tp}")
    if (k // tp) % block:
        return Problem(module, tp, "input_partition",
                       f"input_size_per_partition {k}/{tp} = {k // tp} is not divisible by block_k {block}")
    return None


def serve_problems(modules: dict[str, tuple[int, int]], tp: int, block: int = BLOCK,
                   num_kv_heads: int | None = None) -> list[Problem]:
    """Quantized modules that vLLM / SGLang refuse at tensor parallel size ``tp``, in ``modules`` order.

    modules: name -> full weight shape (N, K). Column-parallel: N/tp must divide evenly and be a multiple of
    ``block``; row-parallel, tp > 1: K/tp likewise. ``num_kv_heads``: apply the kv-head replication of the servers.
    """
    if tp < 1:
        raise ValueError(f"serve tp={tp} must be >= 1")
    out = []
    for module, (n, k) in modules.items():
        style = parallel_style(module)
        if leaf(module) in NEVER_FP8:
            p = Problem(module, tp, "never_fp8", f"the servers build {leaf(module)} unquantized (a router, a gate, "
                                                 f"gated DeltaNet's b/a projection or the indexer's weights_proj) and "
                                                 f"cannot load an FP8 weight into it; keep it in the source dtype")
        elif style == "column":
            p = _column_problem(module, n, tp, block, num_kv_heads)
        elif style == "row":
            p = _row_problem(module, k, tp, block)
        else:
            p = None
        if p is not None:
            out.append(p)
    return out


FULL_WIDTH_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")


def norm_problems(norms: dict[str, int], tp: int, num_heads: int, num_kv_heads: int, head_dim: int) -> list[Problem]:
    """Full-width q/k RMSNorms (MiniMax-M2: ``q_norm`` [heads * head_dim], ``k_norm`` [kv_heads * head_dim]) that a
    server at ``tp`` cannot split with the attention heads it shards: each rank normalizes its own heads' slice of
    the weight, so the heads must split evenly, and a k_norm cannot follow kv heads that are replicated
    (tp > num_key_value_heads: each rank holds one whole head of ``head_dim`` values, the norm's 1/tp slice is
    fewer). ``norms``: HF name -> length; per-head norms ([head_dim]) have no such rule."""
    out = []
    for name, n in norms.items():
        if n == head_dim or not name.endswith(FULL_WIDTH_NORMS):
            continue
        heads = num_kv_heads if name.endswith("k_norm.weight") else num_heads
        if heads % tp == 0:
            continue
        why = (f"{heads} kv heads at tp {tp}: the kv heads are replicated, and a 1/{tp} slice of the {n}-wide norm "
               f"({n}/{tp} = {n / tp:g} values) is not one head ({head_dim})" if heads < tp else
               f"{heads} heads % tp {tp} = {heads % tp}: the norm's slices do not follow whole heads")
        out.append(Problem(name[:-len(".weight")], tp, "norm_split", f"full-width RMSNorm [{n}]: {why}"))
    return out


def transformers_problems(modules: dict[str, tuple[int, int]], block: int = BLOCK) -> list[Problem]:
    """Quantized modules whose full N or K is not a multiple of ``block``: transformers' dequantizer (used on CPU, and
    with ``dequantize=True``) takes the block size as ``rows // scale_rows`` and ``cols // scale_cols``, so such a
    weight is silently dequantized wrong when that divides (192 rows, 2 scale rows -> block 96) and refused when it
    does not (576 rows, 5 scale rows). vLLM and SGLang handle them."""
    out = []
    for module, (n, k) in modules.items():
        bad = [f"{what} {v} % {block} = {v % block}" for what, v in (("N", n), ("K", k)) if v % block]
        if not bad:
            continue
        grid = (-(-n // block), -(-k // block))
        if n % grid[0] == 0 and k % grid[1] == 0:
            effect = (f"transformers' dequantize takes the block as {n}//{grid[0]} x {k}//{grid[1]} = "
                      f"{n // grid[0]} x {k // grid[1]}: silently wrong values")
        else:
            effect = (f"transformers' dequantize refuses it ({n} x {k} is not divisible by the scale grid "
                      f"{grid[0]} x {grid[1]})")
        out.append(Problem(module, None, "transformers_dims",
                           f"weight [{n}, {k}]: {', '.join(bad)}; {effect}; vLLM/SGLang are fine (keep it "
                           f"unquantized with quant.serve_tp=transformers to load it there)"))
    return out


def layers_for_transformers(modules: dict[str, tuple[int, int]], block: int = BLOCK) -> list[str]:
    """Modules (sorted, with their fusion groups) to keep unquantized so that transformers dequantizes every
    quantized weight right."""
    broken = {p.module for p in transformers_problems(modules, block)}
    groups = {fusion_group(m) for m in broken} - {None}
    return sorted(broken | {m for m in modules if fusion_group(m) in groups})


def fusion_group(module: str) -> str | None:
    """The fused server module ``module`` belongs to, or None.

    ``X.self_attn.{q,k,v}_proj`` -> ``X.self_attn.qkv_proj``; ``X.{gate,up}_proj`` -> ``X.gate_up_proj``;
    ``X.experts.{e}.{gate,up,down}_proj`` -> ``X.experts`` (one fused MoE module per layer).
    """
    m = _EXPERT_RE.match(module)
    if m and (m.group("leaf") in ("gate_proj", "up_proj", "down_proj") or m.group("leaf") in _EXPERT_W):
        return m.group("group")
    parent, _, name = module.rpartition(".")
    if name in ("q_proj", "k_proj", "v_proj"):
        return f"{parent}.qkv_proj"
    if name in ("gate_proj", "up_proj"):
        return f"{parent}.gate_up_proj"
    for group in archs.fusion_groups():     # the other architectures' groups (MLA: q_a_proj + kv_a_proj_with_mqa)
        if name in group:
            return f"{parent}.{'+'.join(group)}"
    return None


def fused_partial_problems(quantized: Iterable[str], unquantized: Iterable[str]) -> list[Problem]:
    """Fusion groups with both quantized and unquantized members: vLLM / SGLang refuse them at any tp
    ("some but not all shards ... are quantized")."""
    unq_groups: dict[str, list[str]] = {}
    for m in unquantized:
        g = fusion_group(m)
        if g is not None:
            unq_groups.setdefault(g, []).append(m)
    out = []
    for m in quantized:
        g = fusion_group(m)
        if g is not None and g in unq_groups:
            out.append(Problem(m, None, "fused_partial",
                               f"quantized, but {', '.join(sorted(unq_groups[g])[:3])} of the same fused module "
                               f"{g} is not; servers need all of its parts quantized or all unquantized"))
    return out


def layers_to_keep_unquantized(modules: dict[str, tuple[int, int]], tp: int | Iterable[int], block: int = BLOCK,
                               num_kv_heads: int | None = None) -> list[str]:
    """Module names (sorted) to keep unquantized so that the checkpoint serves at ``tp`` (one size or several).

    Every module that breaks a rule, plus the other quantized members of its fusion group (q/k/v, gate/up, all
    experts of a layer).
    """
    tps = [tp] if isinstance(tp, int) else list(tp)
    broken = {p.module for t in tps for p in serve_problems(modules, t, block, num_kv_heads)}
    groups = {fusion_group(m) for m in broken} - {None}
    keep = broken | {m for m in modules if fusion_group(m) in groups}
    return sorted(keep)


__all__ = ["Problem", "serve_problems", "norm_problems", "NEVER_FP8",
           "transformers_problems", "layers_for_transformers", "fused_partial_problems",
           "layers_to_keep_unquantized", "fusion_group", "parallel_style", "COLUMN_PARALLEL", "ROW_PARALLEL"]
