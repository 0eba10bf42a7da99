"""torchrun worker: ``iter_fp8`` and ``iter_fp8_buckets`` of a Megatron model built from an HF source, against the
single-process reference quantization of the source's tensors, byte for byte; then a pass stopped early on rank 0
followed by a full pass. Rank 0 prints one ``STREAM`` line.

    worker.py SRC TP PP EP BUCKET_BYTES
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from megatron_fp8pb import iter_fp8, iter_fp8_buckets  # noqa: E402
from megatron_fp8pb.config import ParallelConfig, load_config  # noqa: E402
from megatron_fp8pb.parallel import collectives as coll  # noqa: E402
from megatron_fp8pb.parallel import session  # noqa: E402
from megatron_fp8pb.quant.reference import quantize_blockfp8_reference  # noqa: E402
from megatron_fp8pb.sources.registry import build_source  # noqa: E402

SCALE = ".weight_scale_inv"


def source_state(src: Path) -> dict[str, torch.Tensor]:
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    state = {}
    for f in sorted(set(index.values())):
        state.update(load_file(str(src / f)))
    return state


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def against_reference(pairs: list[tuple[str, torch.Tensor]], state: dict[str, torch.Tensor]) -> dict:
    """Names that differ from the reference, appear twice, or are missing."""
    names = [n for n, _ in pairs]
    got = dict(pairs)
    bad = []
    for name, t in pairs:
        if name.endswith(SCALE):
            _, want = quantize_blockfp8_reference(state[name[:-len(SCALE)] + ".weight"])
        elif t.dtype == torch.float8_e4m3fn:
            want, _ = quantize_blockfp8_reference(state[name])
        else:
            want = state.get(name)
        if want is None or not same_bytes(t.cpu(), want):
            bad.append(name)
    expected = set(state) | {n[:-len(".weight")] + SCALE for n in state
                             if n in got and got[n].dtype == torch.float8_e4m3fn}
    return {"bad": bad[:5], "dup": sorted({n for n in names if names.count(n) > 1})[:5],
            "missing": sorted(expected - set(names))[:5], "extra": sorted(set(names) - expected)[:5],
            "fp8": sum(t.dtype == torch.float8_e4m3fn for _, t in pairs)}


def main(src: str, tp: int, pp: int, ep: int, bucket_bytes: int) -> None:
    parallel = ParallelConfig(tp=tp, pp=pp, ep=ep, backend="gloo", device="cpu", timeout_s=120)
    with session.started(parallel) as job:
        cfg = load_config(None, ["source.kind=hf", f"source.path={src}", f"parallel.tp={tp}", f"parallel.pp={pp}",
                                 f"parallel.ep={ep}"])
        source = build_source(cfg, job.layout, on_gpu=False)
        model, hfc = source.model, source.hf_config
        pairs = [(n, t.clone()) for n, t in iter_fp8(model, hfc)]
        buckets = [[(n, t.clone()) for n, t in b] for b in iter_fp8_buckets(model, hfc, bucket_bytes=bucket_bytes)]
        early = []
        stream = iter_fp8(model, hfc)
        for n, _ in stream:
            early.append(n)
            if len(early) == 3:
                break
        stream.close()
        after = [n for n, _ in iter_fp8(model, hfc)]
        if coll.rank() != 0:
            assert pairs == [] and buckets == [] and early == [] and after == [], "only rank 0 gets tensors"
            return
        report = against_reference(pairs, source_state(Path(src)))
        flat = [p for b in buckets for p in b]
        sizes = [sum(t.numel() * t.element_size() for _, t in b) for b in buckets]
        report.update(
            tensors=len(pairs), buckets=len(buckets),
            buckets_equal=[n for n, _ in flat] == [n for n, _ in pairs] and all(
                same_bytes(a, b) for (_, a), (_, b) in zip(flat, pairs)),
            over=[s for s, b in zip(sizes, buckets) if s > bucket_bytes and len(b) > 1],
            alone=sum(1 for s in sizes if s > bucket_bytes),
            early=early == [n for n, _ in pairs[:3]], after=after == [n for n, _ in pairs])
        print("STREAM " + json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:6]))
