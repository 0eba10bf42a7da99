"""torchrun worker for tests: build a Megatron model from an HF checkpoint, then either save it as a Megatron
distributed checkpoint (``save``) or export it with the in-process API (``api``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from megatron_fp8pb import export
from megatron_fp8pb.parallel import collectives as coll
from megatron_fp8pb.parallel import megatron as mcore
from megatron_fp8pb.parallel import session  # noqa: E402
from megatron_fp8pb.config import ParallelConfig, load_config  # noqa: E402
from megatron_fp8pb.sources.registry import build_source  # noqa: E402


def main(mode: str, src: str, dst: str, tp: int, pp: int, scale_fmt: str = "amax", serve_tp: str = "none") -> None:
    with session.started(ParallelConfig(tp=tp, pp=pp, backend="gloo", device="cpu", timeout_s=120)) as job:
        cfg = load_config(None, ["source.kind=hf", f"source.path={src}", f"parallel.tp={tp}", f"parallel.pp={pp}"])
        source = build_source(cfg, job.layout, on_gpu=False)
        if mode == "save":
            mcore.save_dist_checkpoint(source.model, dst)
        elif mode == "iter":
            iter_against_files(source, dst)
        else:
            result = export(source.model, source.hf_config, dst, max_shard_size="200KB", scale_fmt=scale_fmt,
                            serve_tp=None if serve_tp == "none" else serve_tp)
            if coll.rank() == 0:
                print(f"API_EXPORT_OK tensors={result.num_tensors} bytes={result.bytes_written}")


def iter_against_files(source, dst: str) -> None:
    """The in-memory stream against the files of the same export, byte for byte."""
    export(source.model, source.hf_config, dst, max_shard_size="200KB")
    import json
    from safetensors import safe_open
    from megatron_fp8pb import iter_fp8
    names, bad = [], []
    if coll.rank() == 0:
        index = json.loads((Path(dst) / "model.safetensors.index.json").read_text())["weight_map"]
    for name, t in iter_fp8(source.model, source.hf_config):
        names.append(name)
        with safe_open(str(Path(dst) / index[name]), "pt") as f:
            want = f.get_tensor(name)
        if t.dtype != want.dtype or t.shape != want.shape or not torch.equal(
                t.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)):
            bad.append(name)
    if coll.rank() == 0:
        missing = sorted(set(index) - set(names))
        print(f"ITER_FP8 tensors={len(names)} mismatched={bad[:5]} missing={missing[:5]} "
              f"in_file_order={names == sorted(index, key=names.index) if not missing else False}")
    else:
        assert names == []

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), *sys.argv[6:8])
