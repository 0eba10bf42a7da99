"""Export configuration: frozen dataclasses, YAML files as diffs over the defaults, dotted overrides.

Unknown keys and wrong types are refused with the key's full dotted name. Every check of the values themselves lives
in the dataclasses' ``__post_init__`` (so a config built in code is checked like one read from YAML); the allowed
values of a choice are its ``Literal`` type. ``ParallelConfig.resolved()`` turns "auto" and ``etp=None`` into what
the run uses.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import typing
from dataclasses import dataclass, field
from typing import ClassVar, Literal
from pathlib import Path

import yaml


Backend = Literal["auto", "gloo", "nccl"]
Device = Literal["auto", "cpu", "cuda"]
ScaleFmt = Literal["amax", "ue8m0"]
Writers = Literal["rank0", "node"]


def choices(cls, name: str) -> tuple | None:
    """The allowed values of field ``name`` of config dataclass ``cls`` (its ``Literal``), None for a free value."""
    hint = typing.get_type_hints(cls)[name]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def _check_choices(obj) -> None:
    for f in dataclasses.fields(obj):
        allowed, value = choices(type(obj), f.name), getattr(obj, f.name)
        if allowed is not None and value not in allowed:
            raise ValueError(f"config key {obj.SECTION}.{f.name}={value!r}: choose one of {', '.join(allowed)}")


def knob(default, help: str, values=None):
    """A config field: its default, its one-line ``--help`` meaning, and ``values``, a function naming the values it
    takes where a registry holds them (a ``Literal`` type names its own)."""
    return field(default=default, metadata={"help": help, "values": values})


def _arch_values() -> str:
    from megatron_fp8pb.archs import presets, tiny_names
    return f"tiny: {', '.join(tiny_names())}; random: {', '.join(presets())}"


def _kind_values() -> str:
    from megatron_fp8pb.sources.kinds import KINDS
    return ", ".join(f"{k.name}: {k.help}" for k in KINDS.values())


@dataclass(frozen=True)
class SourceConfig:
    SECTION: ClassVar[str] = "source"
    kind: str = knob("tiny", "where the weights come from", _kind_values)
    path: str | None = knob(None, "HF checkpoint dir (hf) or Megatron dist checkpoint dir (megatron)")
    arch: str = knob("qwen3", "the model of kind tiny or random", _arch_values)
    num_layers: int = knob(0, "tiny / random: keep this many layers (0: the model's own count)")
    hf_config: str | None = knob(None, "megatron: an HF config.json (or its directory) describing the architecture")
    seed: int = knob(0, "tiny: weights seed")
    tie_embeddings: bool = knob(False, "tiny: tie embeddings and lm_head")
    readahead: bool = knob(True, "hf, megatron: read the source into the page cache from process start")
    megatron_core: bool = knob(False, "megatron: map a dense GPT's checkpoint with megatron-core too (by default its "
                               "keys are read directly and megatron-core is not imported)")
    def __post_init__(self):
        _check_choices(self)
        from megatron_fp8pb.sources.kinds import kind
        kind(self.kind)
        if self.num_layers < 0:
            raise ValueError(f"config key source.num_layers={self.num_layers} must be >= 0 (0: the model's own count)")


@dataclass(frozen=True)
class ResolvedParallel:
    """A ParallelConfig with nothing left to decide: the backend and device named, the expert TP size a number."""
    tp: int
    pp: int
    ep: int
    etp: int
    backend: str                    # gloo | nccl
    on_gpu: bool                    # the model lives on CUDA
    timeout_s: float

    @property
    def device(self) -> str:
        return "cuda" if self.on_gpu else "cpu"


@dataclass(frozen=True)
class ParallelConfig:
    SECTION: ClassVar[str] = "parallel"
    tp: int = knob(1, "tensor parallel size of the export")
    pp: int = knob(1, "pipeline parallel size")
    ep: int = knob(1, "expert parallel size (mixture-of-experts models)")
    etp: int | None = knob(None, "expert tensor parallel; default: tp")
    backend: Backend = knob("auto", "auto: nccl with CUDA, else gloo")
    timeout_s: float = knob(300.0, "collective timeout")
    device: Device = knob("auto", "where the model lives; auto: CUDA when available")
    def __post_init__(self):
        _check_choices(self)
        bad = [f"parallel.{k}={v} must be >= 1" for k, v in
               (("tp", self.tp), ("pp", self.pp), ("ep", self.ep), ("etp", self.etp)) if v is not None and v < 1]
        if self.timeout_s <= 0:
            bad.append(f"parallel.timeout_s={self.timeout_s} must be > 0 (seconds)")
        if bad:
            raise ValueError("; ".join(bad))

    def resolved(self, cuda_available: bool | None = None) -> ResolvedParallel:
        """"auto" and ``etp=None`` decided: device auto is CUDA when available, backend auto is nccl on CUDA and gloo
        on CPU, etp defaults to tp. ``cuda_available``: None asks torch."""
        if cuda_available is None:
            import torch
            cuda_available = torch.cuda.is_available()
        on_gpu = self.device == "cuda" or (self.device == "auto" and cuda_available)
        backend = self.backend if self.backend != "auto" else ("nccl" if on_gpu else "gloo")
        return ResolvedParallel(self.tp, self.pp, self.ep, self.etp or self.tp, backend, on_gpu, self.timeout_s)


@dataclass(frozen=True)
class QuantConfig:
    """What is quantized: the config's quant section, the in-process API's keywords (``quantize``, ``exclude``,
    ``quantize_lm_head``, ``scale_fmt``, ``serve_tp``) and what the planner asks (``quantizes``). In an
    ``options.ExportOptions``, ``exclude`` also holds the modules the serve targets would refuse."""
    SECTION: ClassVar[str] = "quant"
    enabled: bool = knob(True, "false: write the source dtype, byte-identical to the source")
    exclude: tuple[str, ...] = knob((), "fnmatch patterns of HF module names, added to the defaults")
    lm_head: bool = knob(False, "quantize lm_head (unties tied embeddings)")
    serve_tp: str | None = knob(None, "targets whose refusals stay unquantized: a TP size (4), transformers, or "
                                      "4,transformers")
    scale_fmt: ScaleFmt = knob("amax", "block scales: amax is amax/448, ue8m0 that rounded up to a power of two")
    def __post_init__(self):
        _check_choices(self)
        serve_targets(self.serve_tp)
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def serve_targets(self) -> tuple[tuple[int, ...], bool]:
        """(vLLM/SGLang TP sizes, whether transformers is a target) of ``serve_tp``."""
        return serve_targets(self.serve_tp)

    def quantizes(self, module: str, defaults: tuple[str, ...] = ()) -> bool:
        """Whether HF module ``module`` is written in FP8. ``defaults``: the architecture's default excludes
        (``archs.default_exclude``); ``lm_head`` lifts the default exclusion of lm_head."""
        pats = tuple(defaults) + self.exclude
        if module == "lm_head" and self.lm_head:
            pats = tuple(p for p in pats if p != "lm_head")
        return self.enabled and not any(fnmatch.fnmatchcase(module, p) for p in pats)


@dataclass(frozen=True)
class OutputConfig:
    SECTION: ClassVar[str] = "output"
    dir: str = knob("out/tiny-qwen3-fp8", "where the checkpoint appears (written in <dir>.partial, renamed at the end)")
    max_shard_size: str = knob("5GB", "shard size (GB = 10^9, GiB = 2^30)")
    overwrite: bool = knob(False, "replace a non-empty output.dir")
    verify: bool = knob(True, "re-read the output and check it against FORMAT.md (and the source)")
    writers: Writers = knob("rank0", "node: a writer per node into a shared output.dir (one node: as rank0)")
    def __post_init__(self):
        _check_choices(self)
        parse_size(self.max_shard_size)


@dataclass(frozen=True)
class ExportConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def describe_keys(cls=ExportConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, meaning) of every config key, from the fields' metadata, their ``Literal`` choices and
    the registries their ``values`` functions read, so that the list cannot go stale."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(default):
            out += describe_keys(type(default), key + ".")
            continue
        meaning = f.metadata.get("help", "")
        allowed = choices(cls, f.name)
        if f.metadata.get("values"):
            meaning = f"{meaning} ({f.metadata['values']()})"
        elif allowed:
            meaning = f"{meaning} (one of {', '.join(allowed)})".strip()
        shown = default if isinstance(default, str) else "none" if default is None else json.dumps(
            list(default) if isinstance(default, tuple) else default)
        out.append((key, shown, meaning))
    return out


def keys_help() -> str:
    """The --help text of the config keys: one line per key with its default and meaning."""
    rows = describe_keys()
    width = max(len(k) + len(d) for k, d, _ in rows) + 3
    return "\n".join(f"  {f'{k}={d}':<{width}} {m}" for k, d, m in rows)


def _coerce(key: str, value, typ):
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is Literal:
        return _coerce(key, value, type(args[0]))   # the value itself is checked by the dataclass
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.strip("[]").split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"config key {key}: expected a list, got {value!r}")
        return tuple(str(v) for v in value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise TypeError(f"config key {key}: expected true/false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise TypeError(f"config key {key}: expected {typ.__name__}, got {value!r}")
        try:
            out = typ(value)
        except (TypeError, ValueError):
            raise TypeError(f"config key {key}: expected {typ.__name__}, got {value!r}") from None
        if typ is int and isinstance(value, float) and value != int(value):
            raise TypeError(f"config key {key}: expected an integer, got {value!r}")
        return out
    if typ is str:
        if isinstance(value, (dict, list)):
            raise TypeError(f"config key {key}: expected a string, got {value!r}")
        return str(value)
    return value


def _merge(obj, updates: dict, prefix: str = ""):
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise KeyError(f"unknown config key {key!r}; known keys under {prefix or 'the top level'}: "
                           f"{', '.join(sorted(names))}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise TypeError(f"config key {key}: expected a mapping, got {v!r}")
            changes[k] = _merge(cur, v, key + ".")
        else:
            changes[k] = _coerce(key, v, hints[k])
    return dataclasses.replace(obj, **changes)


def _dotted(overrides: list[str]) -> dict:
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. parallel.tp=2)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def serve_targets(value: str | None) -> tuple[tuple[int, ...], bool]:
    """quant.serve_tp -> (vLLM/SGLang TP sizes, whether transformers is a target): "4" -> ((4,), False),
    "transformers" -> ((), True), "2,8,transformers" -> ((2, 8), True), None -> ((), False)."""
    if value is None or str(value).strip() in ("", "none", "null"):
        return (), False
    tps, tf = [], False
    for item in (v.strip() for v in str(value).split(",")):
        if item == "transformers":
            tf = True
        elif item.isdigit() and int(item) >= 1:
            tps.append(int(item))
        elif item:
            raise ValueError(f"config key quant.serve_tp={value!r}: {item!r} is neither a TP size >= 1 nor "
                             f"'transformers'; e.g. quant.serve_tp=4 or quant.serve_tp=4,transformers")
    return tuple(tps), tf


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExportConfig:
    """Defaults, then the YAML file (a diff), then dotted ``key=value`` overrides."""
    cfg = ExportConfig()
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--config {path} does not exist; name a YAML file (see configs/)")
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"--config {path} is not valid YAML: {' '.join(str(e).split())}") from e
        if not isinstance(data, dict):
            raise TypeError(f"config file {path} must hold a mapping")
        cfg = _merge(cfg, data)
    return _merge(cfg, _dotted(list(overrides)))


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000 (huggingface_hub's convention: GB = 10**9, GiB = 2**30)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"output.max_shard_size={size!r} is not a size; write e.g. 5GB, 500MB, 2GiB or a byte count")
    num, unit = float(m.group(1)), (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(num * mult)
