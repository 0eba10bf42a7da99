"""torchrun worker for tests at tp/pp/ep: ``save`` builds a Megatron model from an HF checkpoint and saves it as a
Megatron distributed checkpoint (torch_dist; with a last argument ``singleton``, experts saved as one tensor each
and the content metadata that says so); ``built`` exports such a checkpoint the reference way, loaded whole into a
built Megatron model by megatron-core's dist_checkpointing.load, through the in-process API."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_fp8pb import export
from megatron_fp8pb.parallel import megatron as mcore
from megatron_fp8pb.parallel import session  # noqa: E402
from megatron_fp8pb.config import ParallelConfig, load_config  # noqa: E402
from megatron_fp8pb.sources.registry import build_source  # noqa: E402


def main(mode: str, src: str, dst: str, tp: int, pp: int, ep: int, extra: str = "") -> None:
    """``extra``: "singleton" or nothing for ``save``, the checkpoint for ``built``."""
    parallel = ParallelConfig(tp=tp, pp=pp, ep=ep, backend="gloo", device="cpu", timeout_s=120)
    layout_args = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.ep={ep}"]
    with session.started(parallel) as job:
        if mode == "save":
            cfg = load_config(None, ["source.kind=hf", f"source.path={src}", *layout_args])
            meta = {"singleton_local_shards": True} if extra == "singleton" else None
            mcore.save_dist_checkpoint(build_source(cfg, job.layout, on_gpu=False).model, dst, meta)
        else:
            cfg = load_config(None, ["source.kind=megatron", f"source.path={extra}",
                                     f"source.hf_config={src}/config.json", *layout_args])
            source = build_source(cfg, job.layout, on_gpu=False, stream=False)
            assert source.model is not None
            export(source.model, source.hf_config, dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7]), *sys.argv[7:8])
