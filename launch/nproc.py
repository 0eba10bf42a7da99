"""Prints the processes per node a config needs: ``python launch/nproc.py [--nodes N] [--config F] [k=v ...]``.

The layout needs a world size that is a multiple of tp*pp and of pp*ep*etp. A config file written for a machine
names it in comments (``# nodes: 2``, ``# gpus_per_node: 8``); that world size is kept while the layout divides it
and no override changes the file's layout (else the resolved layout's smallest world size is used), spread over
``--nodes`` (default: the file's ``# nodes:``, else 1).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def header(path: str | None, key: str) -> int | None:
    """The integer of a ``# key: N`` comment line of a config file, or None."""
    if not path:
        return None
    with open(path) as f:
        m = re.search(rf"^#\s*{key}:\s*(\d+)\s*$", f.read(), re.MULTILINE)
    return int(m.group(1)) if m else None


def per_node(need: int, nodes: int, header_nodes: int | None = None, header_gpus: int | None = None) -> int:
    """Processes per node on ``nodes`` nodes for a layout needing a multiple of ``need`` ranks."""
    if nodes < 1:
        raise ValueError(f"nodes={nodes} must be >= 1")
    world = need
    if header_nodes and header_gpus and (header_nodes * header_gpus) % need == 0:
        world = header_nodes * header_gpus
    if world % nodes:
        raise ValueError(f"world size {world} (a multiple of lcm(tp*pp, pp*ep*etp) = {need}) % nodes({nodes}) = "
                         f"{world % nodes} != 0: use a node count that divides it, or set FP8PB_NPROC_PER_NODE")
    return world // nodes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config")
    ap.add_argument("--nodes", type=int, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    from megatron_fp8pb.config import load_config
    from megatron_fp8pb.launcher import min_world
    p = load_config(args.config, args.overrides).parallel
    hn, hg = header(args.config, "nodes"), header(args.config, "gpus_per_node")
    if p != load_config(args.config).parallel:
        hg = None     # the overrides changed the layout: the file's GPU count was sized for another one
    try:
        print(per_node(min_world(p.tp, p.pp, p.ep, p.etp), args.nodes or hn or 1, hn, hg))
    except ValueError as e:
        print(f"nproc: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
