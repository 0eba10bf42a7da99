"""The export as a stream of HF tensors in memory: ``iter_fp8(model, hf_config)`` yields ``(hf_name, tensor)`` on
rank 0 (fp8 weights, their ``weight_scale_inv``, unquantized tensors in the output dtype), in the order and with the
bytes the checkpoint files would hold, for pushing weights to a rollout engine without a disk.

The export runs on a thread of rank 0 (other ranks run it inline); tensors come through a short queue, so host
memory stays the staging slabs plus the largest tensor, whatever the model's size.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

import torch

from megatron_fp8pb.parallel import collectives as coll
from megatron_fp8pb.parallel import session
from .api import model_dims
from megatron_fp8pb.sources.hf import config_dtype
from megatron_fp8pb.exporter.pipeline import run_export
from megatron_fp8pb.exporter.options import ExportOptions, RankView
from megatron_fp8pb.exporter.progress import Phases

_DONE = object()


class TensorSink:
    """Receives the assembled tensors the way BackgroundWriter does (``submit`` with an optional CUDA event and a
    callback that recycles the staging slab) and hands them to a queue as whole tensors; row chunks of tensors
    larger than a slab are gathered into one tensor first."""

    def __init__(self, specs, q: queue.Queue):
        self.specs = {s.name: s for s in specs}
        self.q, self.writer, self.phases, self.files = q, self, None, []
        self.bytes_written = 0
        self.discard = False
        self._rows: dict[str, tuple[torch.Tensor, int]] = {}

    def check(self) -> None:
        pass

    def submit(self, name: str, tensor: torch.Tensor, event=None, done=None, row0: int | None = None) -> None:
        if event is not None:
            event.synchronize()
        if row0 is not None and tuple(tensor.shape) != tuple(self.specs[name].shape):
            spec = self.specs[name]
            full, got = self._rows.get(name, (None, 0))
            if full is None:
                full = torch.empty(spec.shape, dtype=spec.dtype)
            full[row0:row0 + tensor.shape[0]].copy_(tensor)
            if done is not None:
                done()
            got += tensor.shape[0]
            if got < spec.shape[0]:
                self._rows[name] = (full, got)
                return
            self._rows.pop(name, None)
            tensor, done = full, None
        self.bytes_written += tensor.numel() * tensor.element_size()
        if self.discard:
            if done is not None:
                done()
            return
        self.q.put((name, tensor, done))

    def finish(self, extra_files: dict) -> None:
        pass

    def abort(self) -> None:
        pass


def iter_fp8(model, hf_config, *, quantize: bool = True, exclude: tuple[str, ...] = (),
             quantize_lm_head: bool = False, out_dtype: torch.dtype | None = None, scale_fmt: str = "amax",
             serve_tp: str | int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Call on every rank of the model's job (parallel_state initialized) and exhaust it on every rank. Rank 0 gets
    ``(hf_name, host tensor)`` pairs; a tensor is valid until the next pair is asked for (clone it to keep it).
    Other ranks get nothing (their pieces go to rank 0). ``scale_fmt``, ``serve_tp``: as ``api.export``."""
    d = model_dims(model, hf_config)
    job = session.joined()
    layout, groups = job.layout, job.groups
    options = ExportOptions.from_keywords(d, quantize=quantize, exclude=exclude, quantize_lm_head=quantize_lm_head,
                                          scale_fmt=scale_fmt, serve_tp=serve_tp,
                                          out_dtype=out_dtype or config_dtype(hf_config))
    view = RankView.of_model(model, d, layout)
    if coll.rank() != 0:
        run_export(view, d, layout, groups, hf_config, None, options)
        return
    q: queue.Queue = queue.Queue(maxsize=2)
    holder: dict = {}

    def make_sink(specs):
        holder["sink"] = TensorSink(specs, q)
        holder["sink"].phases = Phases()
        return holder["sink"]

    def work():
        try:
            run_export(view, d, layout, groups, hf_config, None, options, sink=make_sink)
            q.put(_DONE)
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
            q.put(e)

    thread = threading.Thread(target=work, name="fp8pb-iter", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            name, tensor, done = item
            try:
                yield name, tensor
            finally:
                if done is not None:
                    done()
    finally:
        if thread.is_alive():   # the caller stopped early: let the export finish (other ranks wait on it)
            if "sink" in holder:
                holder["sink"].discard = True
            while thread.is_alive():
                try:
                    item = q.get(timeout=0.1)
                    if isinstance(item, tuple) and item[2] is not None:
                        item[2]()
                except queue.Empty:
                    pass
        thread.join()
