"""End to end from an HF bf16 checkpoint on disk to the FP8 checkpoint on disk, at two depths: ours against the
read + write floor (reading the source files, writing the output's bytes with fsync) and against llm-compressor
FP8_BLOCK when it can be imported, same checkpoint, same run, page cache dropped before each timed step where allowed
(root); the growth of peak RSS between the depths. (bench/e2e.py compares source file layouts.)

  python bench/e2e_depths.py --quick                 # CPU, tp=2, llama-200m shapes at 4 and 12 layers, < 5 minutes
  python bench/e2e_depths.py --gpu                   # one GPU, Llama-3-8B shapes (32 layers; 4 for the RSS slope)
  python bench/e2e_depths.py --gpu --arch llama3-70b --layers 2,8
  python bench/e2e_depths.py --gpu --repeats 2 --megatron   # also as a Megatron dist checkpoint (tp=1)
  python bench/e2e_depths.py --gpu --repeats 3 --peer-repeats 2 --trace     # medians, and the disks' MB/s

Last line: ``e2e_vs_floor=X peak_rss_slope=Y`` (ours over the floor at the deepest source; growth of the largest
rank peak RSS per byte of source between the two depths).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_runs import (_median_run, _runs_label, _show, agreement, drop_caches, read_floor, run_ours,  # noqa: E402
                      run_peer, save_megatron_checkpoint, startup_floor, write_floor, write_random_source)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="CPU, tp=2, llama-200m shapes, < 5 minutes")
    ap.add_argument("--gpu", action="store_true", help="one GPU, tp=1")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--layers", default=None, help="two depths, comma-separated: the RSS slope between them")
    ap.add_argument("--nproc", type=int, default=None)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="runs of ours at the deepest source (the median is shown)")
    ap.add_argument("--peer-repeats", type=int, default=1, help="runs of the peer (the median is shown)")
    ap.add_argument("--trace", action="store_true",
                    help="print what the disks did (MB/s read and written every 0.5 s) during each timed run")
    ap.add_argument("--megatron", action="store_true",
                    help="also save the deepest source as a Megatron dist checkpoint and export that (needs megatron-core)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    arch = args.arch or ("llama3-8b" if args.gpu else "llama-200m")
    nproc = args.nproc or (1 if args.gpu else 2)
    layers = [int(x) for x in (args.layers or ("4,32" if args.gpu else "4,12")).split(",")]
    extra = [f"parallel.tp={nproc}"] + ([] if args.gpu else ["parallel.device=cpu", "output.max_shard_size=200MB"])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fp8pb-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "e2e.log"
    runs = {}
    dropped = False
    for n in layers:
        src, out = work / f"src-{n}", work / f"ours-{n}"
        t0 = time.perf_counter()
        src_bytes = write_random_source(src, arch, n)
        print(f"{n} layers: source {src_bytes / 1e9:.2f} GB written in {time.perf_counter() - t0:.1f} s", flush=True)
        tries = []
        for _ in range(args.repeats if n == layers[-1] else 1):
            dropped = drop_caches(out)
            ours = run_ours(src, out, nproc, extra, log, trace=args.trace and n == layers[-1])
            _show(f"{n} layers: ours {ours['seconds']:.1f} s, peak RSS per rank "
                  f"{[round(r / 1e9, 2) for r in ours['rss']]} GB; {ours['phases']}; rank 0 {ours['marks']}", ours)
            tries.append(ours)
        ours = _median_run(tries)
        runs[n] = dict(src_bytes=src_bytes, ours=ours, seconds_each=[t["seconds"] for t in tries])
        if n != layers[-1]:
            shutil.rmtree(out)
            shutil.rmtree(src)
    n = layers[-1]
    src, out = work / f"src-{n}", work / f"ours-{n}"
    r = runs[n]
    drop_caches()
    rf = read_floor(src)
    drop_caches()
    wf = write_floor(work, r["ours"]["out_bytes"])
    floor = rf + wf
    drop_caches()
    sf = startup_floor(args.gpu)
    mg = None
    if args.megatron:
        ck = work / f"megatron-{n}"
        saved_s = save_megatron_checkpoint(src, ck, log)
        runs_m = []
        for _ in range(args.repeats):
            drop_caches(work / "ours-megatron")
            runs_m.append(run_ours(src, work / "ours-megatron", nproc, extra, log, [
                "source.kind=megatron", f"source.path={ck}", f"source.hf_config={src}/config.json"], trace=args.trace))
            _show(f"{n} layers, Megatron checkpoint: ours {runs_m[-1]['seconds']:.1f} s; {runs_m[-1]['phases']}; "
                  f"rank 0 {runs_m[-1]['marks']}", runs_m[-1])
        same = all((work / "ours-megatron" / f.name).read_bytes() == f.read_bytes() for f in out.glob("*.safetensors"))
        drop_caches()
        mg = dict(saved_s=saved_s, read_floor=read_floor(ck, "*.distcp"), same=same,
                  ours=_median_run(runs_m),
                  seconds_each=[t["seconds"] for t in runs_m])
    peer = None
    if not args.no_peer:
        peers = []
        for _ in range(args.peer_repeats):
            drop_caches(work / "peer")
            got = run_peer(src, work / "peer", work, log, trace=args.trace)
            if got is None:
                break
            _show(f"{n} layers: llm-compressor {got['seconds']:.1f} s", got)
            got["durable"] = got["seconds"] + got["sync_s"]
            peers.append(got)
        peer = _median_run(peers) if peers else None
        if peer:
            peer["seconds_each"] = [t["seconds"] for t in peers]
            peer["durable_each"] = [t["durable"] for t in peers]
            peer["durable_median"] = _median_run(peers, "durable")["durable"]
    import torch
    dev = torch.cuda.get_device_name(0) if args.gpu and torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\ne2e on {dev}: {arch} shapes, {n} layers, source {r['src_bytes'] / 1e9:.2f} GB, nproc={nproc}, page "
          f"cache {'dropped' if dropped else 'NOT dropped (not root)'}\n")
    print("| variant | seconds | x floor | peak RSS GB (max rank) | export added GB (max rank) | output GB |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| read floor | {rf:.2f} | | | | |")
    print(f"| write floor (fsync) | {wf:.2f} | | | | |")
    print(f"| read + write floor | {floor:.2f} | 1.00 | | | |")
    print(f"| start-up floor: cold `import torch`{' + CUDA context' if args.gpu else ''} | {sf:.2f} | | | | |")
    each = _runs_label(r["seconds_each"])
    print(f"| ours{each} | {r['ours']['seconds']:.2f} | {r['ours']['seconds'] / floor:.2f} | {max(r['ours']['rss']) / 1e9:.2f}"
          f" | {max(r['ours']['added']) / 1e9:.2f} | {r['ours']['out_bytes'] / 1e9:.2f} |")
    if peer:
        print(f"| llm-compressor FP8_BLOCK{_runs_label(peer['seconds_each'])} | {peer['seconds']:.2f} | {peer['seconds'] / floor:.2f} | "
              f"{peer['peak_rss_gb']:.2f} | | {peer['out_bytes'] / 1e9:.2f} |")
        durable = peer["durable_median"]
        print(f"| llm-compressor, then `sync` of the output it left in the page cache{_runs_label(peer['durable_each'])}"
              f" | {durable:.2f} | {durable / floor:.2f} | | | |")
        ours_mean = sum(r["seconds_each"]) / len(r["seconds_each"])
        peer_mean = sum(peer["seconds_each"]) / len(peer["seconds_each"])
        print(f"\npeer phases: imports {peer['imports_s']:.1f} s, load {peer['load_s']:.1f} s, quantize "
              f"{peer['quantize_s']:.1f} s, save {peer['save_s']:.1f} s (to the page cache; its sync took "
              f"{peer['sync_s']:.1f} s after)")
        print(f"ours vs peer: {peer['seconds'] / r['ours']['seconds']:.2f}x faster (medians), "
              f"{peer_mean / ours_mean:.2f}x (means), {min(peer['seconds_each']) / max(r['seconds_each']):.2f}x (our "
              f"slowest run against its fastest); against the peer with its output on disk: "
              f"{durable / r['ours']['seconds']:.2f}x (medians)")
        names = [f"model.layers.{i}.{m}.weight" for i in (0, n - 1) for m in ("self_attn.q_proj", "mlp.down_proj")]
        print("agreement: " + agreement(out, work / "peer", names))
    if mg:
        mfloor = mg["read_floor"] + wf
        each = _runs_label(mg["seconds_each"])
        print(f"\nFrom the same weights saved as a Megatron dist checkpoint (torch_dist, tp=1; saved in "
              f"{mg['saved_s']:.0f} s):\n")
        print("| variant | seconds | x floor | peak RSS GB (max rank) | export added GB (max rank) | output GB |")
        print("|---|---:|---:|---:|---:|---:|")
        print(f"| read floor (.distcp files) | {mg['read_floor']:.2f} | | | | |")
        print(f"| read + write floor | {mfloor:.2f} | 1.00 | | | |")
        print(f"| ours, source.kind=megatron{each} | {mg['ours']['seconds']:.2f} | {mg['ours']['seconds'] / mfloor:.2f} | "
              f"{max(mg['ours']['rss']) / 1e9:.2f} | {max(mg['ours']['added']) / 1e9:.2f} | "
              f"{mg['ours']['out_bytes'] / 1e9:.2f} |")
        print(f"\nfiles byte-identical to the HF source's export: {mg['same']}; ours over the read + write + start-up "
              f"floor: {mg['ours']['seconds'] / (mfloor + sf):.2f}x; phases: {mg['ours']['phases']}; rank 0 "
              f"{mg['ours']['marks']}")
    print(f"ours phases: {r['ours']['phases']}; rank 0 {r['ours']['marks']}")
    a, b = runs[layers[0]], runs[layers[-1]]
    slope = (max(b["ours"]["added"]) - max(a["ours"]["added"])) / max(b["src_bytes"] - a["src_bytes"], 1)
    print(f"ours over the read + write + start-up floor ({floor + sf:.2f} s): {r['ours']['seconds'] / (floor + sf):.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=dev, arch=arch, runs={str(k): v for k, v in runs.items()},
                                                    read_floor=rf, write_floor=wf, startup_floor=sf, peer=peer,
                                                    megatron=mg), indent=2))
    print(f"e2e_vs_floor={r['ours']['seconds'] / floor:.2f} peak_rss_slope={slope:.3f}")


if __name__ == "__main__":
    main()

