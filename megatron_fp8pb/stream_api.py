"""The export as a stream of HF tensors in memory: ``iter_fp8(model, hf_config)`` yields ``(hf_name, tensor)`` on
rank 0 (fp8 weights, their ``weight_scale_inv``, unquantized tensors in the output dtype), in the order and with the
bytes the checkpoint files would hold, for pushing weights to a rollout engine without a disk.
``iter_fp8_buckets`` groups the same pairs into lists of at most ``bucket_bytes``. ``FP8Stream`` is the same stream
made once and iterated once per weight push: a model held whole by one process on one GPU keeps its plan between
passes (stream/packed.py).

The export runs on a thread of rank 0 (other ranks run it inline); tensors come through a queue bounded in bytes
(stream/sink.py), so memory stays about ``IN_FLIGHT_BYTES`` plus the largest tensor, whatever the model's size.
"""
from __future__ import annotations

import queue
import threading
import weakref
from typing import Iterator

import torch

from megatron_fp8pb.parallel import collectives as coll
from megatron_fp8pb.parallel import session
from .api import model_dims
from megatron_fp8pb.sources.hf import config_dtype
from megatron_fp8pb.exporter.pipeline import run_export
from megatron_fp8pb.exporter.options import ExportOptions, RankView
from megatron_fp8pb.exporter.progress import Phases
from megatron_fp8pb.stream.buckets import bucketed
from megatron_fp8pb.stream.packed import PackedPlan, param_key
from megatron_fp8pb.stream.sink import IN_FLIGHT_BYTES, InFlight, StreamSink

_DONE = object()
DEVICES = ("cpu", "cuda")


def stream_device(device: str | torch.device) -> torch.device:
    """``"cpu"`` or ``"cuda"`` (``"cuda:N"``) as a torch device; ``cuda`` without an index is the current GPU."""
    dev = torch.device(device)
    if dev.type not in DEVICES:
        raise ValueError(f"iter_fp8(device={device!r}): the stream yields host tensors (\"cpu\") or GPU tensors "
                         f"(\"cuda\"), not {dev.type}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"iter_fp8(device={device!r}) needs CUDA, which torch does not see here; use "
                             f"device=\"cpu\"")
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    return dev


def _options(d, hf_config, quantize=True, exclude=(), quantize_lm_head=False, out_dtype=None, scale_fmt="amax",
             serve_tp=None) -> ExportOptions:
    return ExportOptions.from_keywords(d, quantize=quantize, exclude=exclude, quantize_lm_head=quantize_lm_head,
                                       scale_fmt=scale_fmt, serve_tp=serve_tp,
                                       out_dtype=out_dtype or config_dtype(hf_config))


def iter_fp8(model, hf_config, *, device: str | torch.device = "cpu", quantize: bool = True,
             exclude: tuple[str, ...] = (), quantize_lm_head: bool = False, out_dtype: torch.dtype | None = None,
             scale_fmt: str = "amax", serve_tp: str | int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's ``(hf_name, tensor)`` pairs on rank 0, in file order; call on every rank and exhaust it
    (or close it) on every rank.

    ``device="cpu"``: host tensors (pinned when the model is on the GPU). ``device="cuda"``: tensors in this rank's
    GPU memory, ready on the caller's current stream (for vLLM ``load_weights``, SGLang
    ``update_weights_from_tensor``, CUDA IPC handles); under TP/EP the fp8 pieces and their scale rows are gathered
    into rank 0's GPU memory, never bf16. A yielded tensor stays valid while the caller holds it; unquantized ones
    may share memory with the model's parameters (read them, don't write them). Other ranks get nothing (their
    pieces go to rank 0). Stopping early on rank 0 is safe: the export runs to its end without yielding. A NaN or
    Inf weight raises ValueError naming the HF tensor before that tensor is yielded. ``scale_fmt``, ``serve_tp``: as
    ``api.export``. One pass; a model held whole by one process keeps its plan from one call to the next (the
    ``FP8Stream`` of the same model, config and keywords, kept while the model lives)."""
    keywords = dict(quantize=quantize, exclude=tuple(exclude), quantize_lm_head=quantize_lm_head,
                    out_dtype=out_dtype, scale_fmt=scale_fmt, serve_tp=serve_tp)
    yield from _stream_of(model, hf_config, stream_device(device), keywords)


_STREAMS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()    # model -> {(config, device, keywords): stream}


def _stream_of(model, hf_config, device: torch.device, keywords: dict) -> "FP8Stream":
    """The FP8Stream ``iter_fp8`` iterates: in one process, the one made for the same model, config object, device
    and keywords by an earlier call (its plan is checked against the parameters on every pass); a new one under
    TP/PP/EP (which plans every pass anyway) or for a model that cannot be weakly referenced."""
    if coll.world_size() != 1:
        return FP8Stream(model, hf_config, device=device, **keywords)
    key = (id(hf_config), str(device), tuple(sorted((k, repr(v)) for k, v in keywords.items())))
    try:
        per_model = _STREAMS.setdefault(model, {})
    except TypeError:
        return FP8Stream(model, hf_config, device=device, **keywords)
    stream = per_model.get(key)
    if stream is None or stream.hf_config is not hf_config:
        stream = per_model[key] = FP8Stream(model, hf_config, device=device, weak_model=True, **keywords)
    return stream


def iter_fp8_buckets(model, hf_config, bucket_bytes: int = 512 << 20, **kwargs) -> Iterator[list[tuple]]:
    """``iter_fp8``'s pairs in lists whose tensors hold at most ``bucket_bytes`` together (a tensor larger than
    that comes alone), in file order: one list per call of the rollout engine. Keywords as ``iter_fp8``; a bucket
    stays valid while the caller holds it. Rank 0 gets the buckets, other ranks nothing."""
    yield from bucketed(iter_fp8(model, hf_config, **kwargs), bucket_bytes)


class FP8Stream:
    """``iter_fp8`` made once and iterated once per weight push: ``for name, t in stream: ...`` is one pass,
    ``stream.buckets(n)`` one pass in buckets; keywords as ``iter_fp8``, semantics of each pass the same.

    A model held whole by one process with its parameters on the GPU keeps its plan (HF pieces, coverage, file
    order, launch tables) from one pass to the next while every parameter keeps its name, storage, shape and dtype,
    and is planned again when one changes; each pass still checks every value for NaN/Inf. Under TP/PP/EP, or for
    a model on the CPU, each pass runs the general export (planned per pass)."""

    def __init__(self, model, hf_config, *, device: str | torch.device = "cpu",
                 in_flight_bytes: int = IN_FLIGHT_BYTES, weak_model: bool = False, **keywords):
        d = model_dims(model, hf_config)
        job = session.joined()
        if weak_model:      # held by iter_fp8's cache, which must not keep the model alive
            ref = weakref.ref(model)
            views = lambda: RankView.of_model(ref(), d, job.layout)  # noqa: E731
        else:
            views = lambda: RankView.of_model(model, d, job.layout)  # noqa: E731
        self._init(views, d, job, hf_config, _options(d, hf_config, **keywords), stream_device(device),
                   in_flight_bytes)

    @classmethod
    def of_view(cls, view: RankView, d, job, hf_config, options: ExportOptions, target: torch.device,
                in_flight_bytes: int = IN_FLIGHT_BYTES) -> "FP8Stream":
        """The stream of this rank's share given as a RankView (plain tensors under Megatron names, as the
        benchmark builds them)."""
        self = cls.__new__(cls)
        self._init(lambda: view, d, job, hf_config, options, target, in_flight_bytes)
        return self

    def _init(self, views, d, job, hf_config, options, target, in_flight_bytes) -> None:
        self._views, self.d, self.job, self.hf_config, self.options = views, d, job, hf_config, options
        self.target, self.in_flight_bytes = target, in_flight_bytes
        self._plan: tuple | None = None     # (param_key, PackedPlan or None)

    def _packed(self, view: RankView):
        if coll.world_size() != 1 or not all(torch.is_tensor(p) and p.is_cuda for _, p in view.params):
            return None
        from megatron_fp8pb.quant import triton_kernel
        if not triton_kernel.available():
            return None
        key = param_key(view)
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, PackedPlan.build(view, self.d, self.job.layout, self.options))
        return self._plan[1]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        view = self._views()
        plan = self._packed(view)
        if plan is not None:
            yield from plan.run(self.target, self.in_flight_bytes)
        else:
            yield from stream_view(view, self.d, self.job, self.hf_config, self.options, self.target,
                                   self.in_flight_bytes)

    def buckets(self, bucket_bytes: int = 512 << 20) -> Iterator[list[tuple]]:
        """One pass in lists of pairs of at most ``bucket_bytes`` (``iter_fp8_buckets``)."""
        yield from bucketed(iter(self), bucket_bytes)


def stream_view(view: RankView, d, job, hf_config, options: ExportOptions, target: torch.device,
                in_flight_bytes: int = IN_FLIGHT_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
    """``iter_fp8`` for this rank's share given as a RankView (a Megatron model, or plain tensors under Megatron
    names as the benchmark builds them)."""
    if coll.rank() != 0:
        run_export(view, d, job.layout, job.groups, hf_config, None, options)
        return
    q: queue.Queue = queue.Queue()
    budget = InFlight(in_flight_bytes)
    holder: dict = {}

    def make_sink(specs):
        holder["sink"] = StreamSink(specs, q, target, budget)
        holder["sink"].phases = Phases()
        return holder["sink"]

    def work():
        if target.type == "cuda":
            torch.cuda.set_device(target)
        try:
            run_export(view, d, job.layout, job.groups, hf_config, None, options, sink=make_sink)
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
            name, tensor, ready, nbytes, keep = item
            if ready is not None:
                if tensor.is_cuda:
                    torch.cuda.current_stream(tensor.device).wait_event(ready)
                else:
                    ready.synchronize()
            del keep
            try:
                yield name, tensor
            finally:
                budget.give(nbytes)
                del tensor, item
    finally:
        if thread.is_alive():   # the caller stopped early: let the export finish (other ranks wait on it)
            if "sink" in holder:
                holder["sink"].discard = True
            budget.close()
            while thread.is_alive():
                try:
                    q.get(timeout=0.1)
                except queue.Empty:
                    pass
        thread.join()
