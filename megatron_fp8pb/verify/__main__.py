"""``python -m megatron_fp8pb.verify OUT_DIR [...]``."""
import sys

from .cli import main

sys.exit(main())
