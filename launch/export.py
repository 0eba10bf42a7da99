"""``torchrun --nproc_per_node=N launch/export.py [--config FILE.yaml] [dotted.key=value ...]``: one rank of the
export, from a checkout without installing it (``megatron-fp8pb-export`` is the installed command)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_fp8pb.launcher import entry  # noqa: E402

if __name__ == "__main__":
    entry()
