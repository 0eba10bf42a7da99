"""End to end from an HF bf16 checkpoint on disk to the FP8 checkpoint on disk, per source file layout: ours (as
``megatron-fp8pb-export`` runs, the README's command, which starts its rank itself; ``--launcher torchrun`` for
``torchrun --nproc_per_node=1``, also timed once on the headline layout) against the sequential floor (read the source, then write
the output's bytes) and the concurrent floor (both at once, same disks), and llm-compressor FP8_BLOCK with its
``sync`` counted, all in one run. Software warm, data cold: one untimed export warms the modules, then before each
timed step only the source's pages are evicted (``posix_fadvise(DONTNEED)``) and the previous output deleted.

  python bench/e2e.py --tiny                 # CPU smoke: llama-200m shapes (12 layers), small shards
  python bench/e2e.py --gpu                  # one GPU, Llama-3-8B shapes: 5 GB / 1 GB shards / export-ordered
  python bench/e2e.py --gpu --arch llama3-70b --layers 8 --repeats 2

Layouts (``e2e_layouts``): ``save_pretrained`` (name-sorted in each file, a few shards; the headline), ``hub``
(name-sorted, many shards), ``export`` (the order the export reads), and ``megatron``: the same weights saved by
megatron-core as a distributed checkpoint (torch_dist, tp=1; where megatron-core imports), its floors measured on its
``.distcp`` files. All export the same bytes (checked with ``--check``).
Last line: ``save_pretrained_vs_concurrent=X vs_peer=Y``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from e2e_layouts import LAYOUTS, evict, floors, write_layout  # noqa: E402
from e2e_runs import _median_run, _runs_label, drop_caches, run_ours, run_peer, save_megatron_checkpoint  # noqa: E402
from e2e_runs import write_random_source  # noqa: E402,F401 - bench/device_layouts.sh imports it from here

MEGATRON = "megatron"      # the save_pretrained source saved by megatron-core as a dist checkpoint (torch_dist, tp=1)
SOURCES = (*LAYOUTS, MEGATRON)
SHARDS = {"gpu": {"save_pretrained": 5 << 30, "hub": 1 << 30, "export": 5 << 30},
          "tiny": {"save_pretrained": 100 << 20, "hub": 24 << 20, "export": 100 << 20}}


def default_sources() -> list[str]:
    """Every source; the Megatron one only where megatron-core imports (it saves that source)."""
    import importlib.util
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        print("megatron-core is not importable: the megatron source is skipped", flush=True)
        return list(LAYOUTS)
    return list(SOURCES)


def digest(out: Path) -> str:
    """One hash over the output's files (names and bytes), but the resolved config's, which names the source."""
    from megatron_fp8pb.cli import RESOLVED_CONFIG
    h = hashlib.sha256()
    for f in sorted(out.iterdir()):
        if f.name == RESOLVED_CONFIG:
            continue
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(64 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def make_source(layout: str, args, work: Path, log: Path) -> dict:
    """Write the source of ``layout`` (one of ``LAYOUTS`` or ``MEGATRON``): where it lies, its tensor bytes and data
    files, the command line's source keys and the glob of its data files."""
    if layout != MEGATRON:
        src = work / f"src-{layout}"
        nbytes, files = write_layout(src, args.arch, args.layers, layout, SHARDS[args.mode][layout])
        return dict(src=src, nbytes=nbytes, files=files, keys=None, pattern="*.safetensors")
    hf, src, cfg = work / "src-megatron-hf", work / f"src-{MEGATRON}", work / "megatron-hf-config"
    nbytes, _ = write_layout(hf, args.arch, args.layers, LAYOUTS[0], SHARDS[args.mode][LAYOUTS[0]])
    shutil.rmtree(src, ignore_errors=True)
    saved_s = save_megatron_checkpoint(hf, src, log)
    cfg.mkdir(exist_ok=True)
    shutil.copyfile(hf / "config.json", cfg / "config.json")
    shutil.rmtree(hf)
    print(f"{MEGATRON}: saved by megatron-core in {saved_s:.1f} s", flush=True)
    keys = [f"source.kind={MEGATRON}", f"source.path={src}", f"source.hf_config={cfg / 'config.json'}"]
    return dict(src=src, nbytes=nbytes, files=len(list(src.glob("*.distcp"))), keys=keys, pattern="*.distcp")


def measure_layout(layout: str, args, work: Path, extra: list[str], log: Path, warm: bool) -> dict:
    """Write the source in ``layout``, time ours (``repeats`` runs) and both floors on it; with ``warm`` first an
    untimed export (software warm). The source is removed at the end unless the peer still needs it."""
    out = work / "ours"
    t0 = time.perf_counter()
    made = make_source(layout, args, work, log)
    src, keys = made["src"], made["keys"]
    print(f"{layout}: source {made['nbytes'] / 1e9:.2f} GB in {made['files']} files written in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    if warm:
        shutil.rmtree(out, ignore_errors=True)
        w = run_ours(src, out, 1, extra, log, keys, launcher=args.launcher)
        print(f"warm-up export {w['seconds']:.1f} s (untimed)", flush=True)
    runs = []
    for _ in range(args.repeats):
        shutil.rmtree(out, ignore_errors=True)
        evict(src)
        runs.append(run_ours(src, out, 1, extra, log, keys, launcher=args.launcher))
        print(f"{layout}: ours {runs[-1]['seconds']:.2f} s; {runs[-1]['phases']}; rank 0 {runs[-1]['marks']}",
              flush=True)
    ours = _median_run(runs)
    same = digest(out) if args.check else None
    other = None
    if layout == LAYOUTS[0] and args.launcher != "torchrun" and not args.tiny:
        shutil.rmtree(out, ignore_errors=True)
        evict(src)
        other = run_ours(src, out, 1, extra, log, launcher="torchrun")
        print(f"{layout}: ours under torchrun {other['seconds']:.2f} s; rank 0 {other['marks']}", flush=True)
    mcore = None
    if layout == MEGATRON and args.megatron_core_too:
        shutil.rmtree(out, ignore_errors=True)
        evict(src)
        mcore = run_ours(src, out, 1, extra, log, keys + ["source.megatron_core=true"], launcher=args.launcher)
        mcore["digest"] = digest(out) if args.check else None
        print(f"{layout}: ours mapping it with megatron-core {mcore['seconds']:.2f} s; rank 0 {mcore['marks']}",
              flush=True)
    fl = floors(src, work / "floor", ours["out_bytes"], made["pattern"])
    print(f"{layout}: floors read {fl['read_s']:.2f} s, write {fl['write_s']:.2f} s, both at once "
          f"{fl['concurrent_s']:.2f} s", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return dict(src=src, src_bytes=made["nbytes"], files=made["files"], ours=ours, each=[r["seconds"] for r in runs],
                digest=same, torchrun=other, mcore=mcore, **fl)


def measure_peer(src: Path, work: Path, log: Path, repeats: int) -> dict | None:
    """llm-compressor on ``src``, data cold as ours; its ``sync`` of the output it leaves in the page cache counted."""
    peers = []
    for _ in range(repeats):
        shutil.rmtree(work / "peer", ignore_errors=True)
        evict(src)
        got = run_peer(src, work / "peer", work, log)
        if got is None:
            return None
        got["durable"] = got["seconds"] + got["sync_s"]
        print(f"llm-compressor {got['seconds']:.2f} s + sync {got['sync_s']:.2f} s", flush=True)
        peers.append(got)
    shutil.rmtree(work / "peer", ignore_errors=True)
    peer = _median_run(peers, "durable")
    peer["durable_each"] = [p["durable"] for p in peers]
    return peer


def table(res: dict, peer: dict | None, dev: str, args) -> str:
    head = res.get(LAYOUTS[0]) or next(iter(res.values()))
    lines = [f"e2e on {dev}: {args.arch} shapes, {args.layers} layers, source {head['src_bytes'] / 1e9:.2f} GB bf16, "
             f"output {head['ours']['out_bytes'] / 1e9:.2f} GB, launcher {args.launcher}, software warm, data "
             f"cold (source pages evicted)", "",
             "| layout | files | ours s | read s | write s | sequential floor s | concurrent floor s | ours / "
             "sequential | ours / concurrent | peer + sync s | peer / ours |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for layout, r in res.items():
        s = r["ours"]["seconds"]
        p = (f"{peer['durable']:.2f} | {peer['durable'] / s:.2f}" if peer and layout == LAYOUTS[0] else " | ")
        lines.append(f"| {layout} | {r['files']} | {s:.2f}{_runs_label(r['each'])} | {r['read_s']:.2f} | "
                     f"{r['write_s']:.2f} | {r['sequential_s']:.2f} | {r['concurrent_s']:.2f} | "
                     f"{s / r['sequential_s']:.2f} | {s / r['concurrent_s']:.2f} | {p} |")
    mg = res.get(MEGATRON)
    if mg and mg.get("mcore"):
        t = mg["mcore"]["seconds"]
        lines += ["", f"{MEGATRON} mapped with megatron-core (source.megatron_core=true): {t:.2f} s, "
                  f"{t / mg['concurrent_s']:.2f}x the concurrent floor"]
    if head.get("torchrun"):
        t = head["torchrun"]["seconds"]
        lines += ["", f"{LAYOUTS[0]} under torchrun --nproc_per_node=1: {t:.2f} s, {t / head['concurrent_s']:.2f}x "
                  f"the concurrent floor"]
    if head.get("cold"):
        t = head["cold"]["seconds"]
        lines += [f"{LAYOUTS[0]}, cold everything (page cache dropped, software too): {t:.2f} s, "
                  f"{t / head['concurrent_s']:.2f}x the concurrent floor"]
    if peer:
        lines += ["", f"peer (on the save_pretrained layout): {peer['seconds']:.2f} s to the page cache + sync "
                  f"{peer['sync_s']:.2f} s{_runs_label(peer['durable_each'])}; imports {peer['imports_s']:.1f} s, "
                  f"load {peer['load_s']:.1f} s, quantize {peer['quantize_s']:.1f} s, save {peer['save_s']:.1f} s"]
    if args.check:
        same = len({r["digest"] for r in res.values()} | {r["mcore"]["digest"] for r in res.values()
                                                             if r.get("mcore")}) == 1
        lines += ["", f"outputs byte-identical across layouts: {same}"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--tiny", action="store_true", help="CPU smoke, llama-200m shapes")
    mode.add_argument("--gpu", action="store_true", help="one GPU, Llama-3-8B shapes")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--layouts", default=None, help="comma-separated subset of " + ",".join(SOURCES) + " (default: "
                    "all; megatron where megatron-core imports)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of ours per layout (median shown)")
    ap.add_argument("--peer-repeats", type=int, default=1)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--launcher", default="command", choices=["command", "torchrun"],
                    help="how ours starts (default: the megatron-fp8pb-export command, as the README runs it)")
    ap.add_argument("--check", action="store_true", help="hash the outputs: byte-identical across layouts (default "
                                                          "with --tiny)")
    ap.add_argument("--megatron-core-too", action="store_true", help="also time the megatron source mapped with "
                    "megatron-core (source.megatron_core=true)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.mode = "gpu" if args.gpu else "tiny"
    args.arch = args.arch or ("llama3-8b" if args.gpu else "llama-200m")
    args.layers = args.layers or (32 if args.gpu else 12)
    args.check = args.check or args.tiny
    extra = ["parallel.tp=1"] + ([] if args.gpu else ["parallel.device=cpu", "output.max_shard_size=100MB"])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fp8pb-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "e2e.log"
    layouts = [x for x in (args.layouts or ",".join(default_sources())).split(",") if x]
    unknown = sorted(set(layouts) - set(SOURCES))
    if unknown:
        raise SystemExit(f"--layouts: {unknown} are not layouts; choose from {', '.join(SOURCES)}")
    res, peer = {}, None
    # the Megatron source first (the warm-up export, on it, warms megatron-core too); the headline layout last: its
    # peer run and its cold run (page cache dropped whole) come after every other
    for k, layout in enumerate(sorted(layouts, key=lambda x: (x == LAYOUTS[0], x != MEGATRON))):
        res[layout] = measure_layout(layout, args, work, extra, log, warm=k == 0)
        if layout == LAYOUTS[0] and not args.no_peer:
            peer = measure_peer(res[layout]["src"], work, log, args.peer_repeats)
        if layout == LAYOUTS[0] and args.gpu and drop_caches(work / "ours"):
            # last on this source, so that nothing after it runs on cold software: the page cache dropped whole
            cold = res[layout]["cold"] = run_ours(res[layout]["src"], work / "ours", 1, extra, log,
                                                  launcher=args.launcher)
            print(f"{layout}: ours cold (page cache dropped, software too) {cold['seconds']:.2f} s; rank 0 "
                  f"{cold['marks']}", flush=True)
            shutil.rmtree(work / "ours", ignore_errors=True)
        shutil.rmtree(res[layout]["src"], ignore_errors=True)       # one source on disk at a time
    res = {layout: res[layout] for layout in layouts}
    import torch
    dev = torch.cuda.get_device_name(0) if args.gpu and torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print("\n" + table(res, peer, dev, args))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=dev, arch=args.arch, layers=args.layers, peer=peer, layouts={
            k: {**v, "src": str(v["src"])} for k, v in res.items()}), indent=2, default=str))
    h = res.get(LAYOUTS[0]) or next(iter(res.values()))
    vs_peer = f"{peer['durable'] / h['ours']['seconds']:.2f}" if peer else "n/a"
    print(f"save_pretrained_vs_concurrent={h['ours']['seconds'] / h['concurrent_s']:.2f} vs_peer={vs_peer}")


if __name__ == "__main__":
    main()
