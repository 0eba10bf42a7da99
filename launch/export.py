"""torchrun entry: ``torchrun --nproc_per_node=N launch/export.py [--config FILE.yaml] [dotted.key=value ...]``."""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parser() -> argparse.ArgumentParser:
    from megatron_fp8pb.config import keys_help
    return argparse.ArgumentParser(
        prog="launch/export.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a Megatron-core model to a Hugging Face block-FP8 checkpoint.",
        epilog="config keys (key=default, meaning); set them in the YAML file or as key=value:\n" + keys_help() +
               "\n\nAn expected refusal prints one line and exits 2; FP8PB_DEBUG=1 shows its traceback.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if int(os.environ.get("RANK", "0")) != 0 and any(a in ("-h", "--help") for a in argv):
        return 0      # under torchrun the help is printed once, by rank 0
    ap = parser()
    ap.add_argument("--config", help="YAML file: a diff over the defaults")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. parallel.tp=2")
    args = ap.parse_args(argv)
    from megatron_fp8pb import bytecode_early
    from megatron_fp8pb.sources.readahead import start_for_command_line
    bytecode_early.cleanup_on_sigterm()     # until the job installs its own handler
    try:
        bytecode_early.start_for_command_line(args.config, args.overrides)  # spare cores compile megatron-core
        start_for_command_line(args.config, args.overrides)     # the disk reads the source while torch is imported
        from megatron_fp8pb.errors import cli
        from megatron_fp8pb.cli import run
        return cli(run, args.config, args.overrides)
    finally:
        bytecode_early.cleanup()


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)      # the job has torn down its groups and closed its files: skip the interpreter's teardown
