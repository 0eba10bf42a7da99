"""torchrun entry: ``torchrun --nproc_per_node=N launch/export.py [--config FILE.yaml] [dotted.key=value ...]``."""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Export a Megatron-core model to an HF block-FP8 checkpoint.")
    ap.add_argument("--config", help="YAML file: a diff over the defaults")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. parallel.tp=2")
    args = ap.parse_args(argv)
    from megatron_fp8pb.run import run
    return run(args.config, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
