"""torchrun worker: build a megatron-core model from an HF checkpoint at (tp, ep, etp, pp), export it with the
in-process API, and check the in-memory stream (``iter_fp8``) against the files, byte for byte (prints ``ITER_FP8``
from rank 0)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from megatron_fp8pb.config import ParallelConfig, load_config  # noqa: E402
from megatron_fp8pb.parallel import session  # noqa: E402
from megatron_fp8pb.sources.registry import build_source  # noqa: E402
from worker import iter_against_files  # noqa: E402


def main(src: str, dst: str, tp: int, ep: int, etp: int, pp: int) -> None:
    parallel = ParallelConfig(tp=tp, pp=pp, ep=ep, etp=etp, backend="gloo", device="cpu", timeout_s=120)
    with session.started(parallel) as job:
        cfg = load_config(None, ["source.kind=hf", f"source.path={src}", f"parallel.tp={tp}", f"parallel.pp={pp}",
                                 f"parallel.ep={ep}", f"parallel.etp={etp}"])
        source = build_source(cfg, job.layout, on_gpu=False)
        assert source.model is not None
        iter_against_files(source, dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7]))
