"""Prints the processes per node a config needs: ``python launch/nproc.py [--config F] [--nodes N] [k=v ...]``.

World size is tp * pp * dp, and for MoE a multiple of pp * ep * etp; a config file may name ``# nodes:`` and
``# gpus_per_node:`` in its comments, which win when present.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def header(path: str | None, key: str) -> int | None:
    if not path:
        return None
    m = re.search(rf"^#\s*{key}:\s*(\d+)\s*$", open(path).read(), re.MULTILINE)
    return int(m.group(1)) if m else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    ap.add_argument("--nodes", type=int, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from megatron_fp8pb.config import load_config
    cfg = load_config(args.config, args.overrides)
    p = cfg.parallel
    world = p.tp * p.pp
    if p.ep > 1:
        moe = p.pp * p.ep * (p.etp or p.tp)
        world = world * moe // __import__("math").gcd(world, moe)
    nodes = args.nodes or header(args.config, "nodes") or 1
    per_node = header(args.config, "gpus_per_node") if args.nodes is None else None
    if per_node is None:
        if world % nodes:
            raise SystemExit(f"world size {world} (tp*pp, ep) is not divisible by nodes={nodes}")
        per_node = world // nodes
    print(per_node)


if __name__ == "__main__":
    main()
