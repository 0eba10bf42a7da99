"""Shared test helpers: ragged model dims, HF source checkpoints on disk (and edits of their tensors), free ports,
torchrun launches, byte-exact comparison."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]

# Dims whose TP=2 shards are not multiples of 128 (hidden 320, intermediate 704, vocab 1003): blocks straddle ranks.
RAGGED_DIMS = dict(vocab_size=1003, hidden_size=320, intermediate_size=704, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=256)
# ... with 2 key/value heads of head_dim 80 (q: 160 rows per TP=2 rank), for Llama-family configs.
RAGGED = dict(RAGGED_DIMS, num_key_value_heads=2, head_dim=80)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_hf_source(path: Path, cfg, seed: int = 0, files: int = 2) -> dict[str, torch.Tensor]:
    """An HF bf16 checkpoint (config.json + sharded safetensors + index + generation_config) with seeded weights."""
    from megatron_fp8pb.sources.tiny import random_hf_state
    state = random_hf_state(cfg, seed)
    path.mkdir(parents=True, exist_ok=True)
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(str(path))
    (path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7}))
    names = list(state)
    chunks = [names[i::files] for i in range(files)]
    weight_map = {}
    for k, chunk in enumerate(chunks):
        fname = f"model-{k + 1:05d}-of-{files:05d}.safetensors"
        save_file({n: state[n].contiguous() for n in chunk}, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in chunk})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return state


def module_order(state: dict[str, torch.Tensor], cfg) -> list[str]:
    """The tensor names in the order a model's modules hold them (embedding, layer by layer, final norm, lm_head):
    the order save_pretrained shards a state dict in."""
    from megatron_fp8pb.archs import dims_from_hf, rules_for
    from megatron_fp8pb.plan.params import hf_units
    d = dims_from_hf(cfg)
    unit = hf_units(rules_for(d), d)
    pos = {n: k for k, n in enumerate(state)}
    return sorted(state, key=lambda n: (unit.get(n, 1 << 30), pos[n]))


def rewrite_as_save_pretrained(src: Path, cfg, shard_bytes: int) -> None:
    """Rewrite an HF source's weights the way save_pretrained lays them out: the state dict cut greedily in module
    order into shards of at most ``shard_bytes``, each written by safetensors ``save_file`` (which orders a file's
    tensors by name: ``layers.10`` before ``layers.2``), plus the index."""
    from safetensors.torch import load_file
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(f)))
        f.unlink()
    shards, size = [[]], 0
    for n in module_order(state, cfg):
        b = state[n].numel() * state[n].element_size()
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += b
    weight_map = {}
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n].contiguous() for n in names}, str(src / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))


def rewrite_in_export_order(src: Path, cfg, shard_bytes: int) -> None:
    """Rewrite an HF source's weights with the project's writer, tensors in module order within and across its
    shards (the order the export reads them)."""
    from safetensors.torch import load_file
    from megatron_fp8pb.output.writer import CheckpointWriter, TensorSpec
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(f)))
    names = module_order(state, cfg)
    tmp = src.parent / (src.name + ".export-ordered")
    w = CheckpointWriter(tmp, [TensorSpec(n, state[n].dtype, tuple(state[n].shape)) for n in names], shard_bytes)
    for n in names:
        w.write(n, state[n])
    w.finish({})
    for f in list(src.glob("*.safetensors")) + [src / "model.safetensors.index.json"]:
        f.unlink(missing_ok=True)
    for f in tmp.iterdir():
        f.rename(src / f.name)
    tmp.rmdir()


def ragged_deepseek_v3(q_lora_rank=96, mtp=1):
    """kv_a_proj_with_mqa 128 + 64 = 192 rows (96 per rank at tp 2), q_a_proj 96 rows (48 per rank), dense ffn 640
    (320 per rank), experts of 160 (80 per rank at etp 2), shared expert 160; layer 0 dense, layer 1 MoE, and (as
    DeepSeek-V3's config) one multi-token-prediction layer, HF layer 2."""
    import transformers as tf
    return tf.DeepseekV3Config(
        vocab_size=1003, hidden_size=320, intermediate_size=640, moe_intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=q_lora_rank, kv_lora_rank=128,
        qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64, max_position_embeddings=256, rope_scaling=None,
        num_nextn_predict_layers=mtp)


def claim_mtp_layers(src: Path, n: int = 1) -> None:
    """Edit an HF checkpoint's config.json to name ``n`` multi-token-prediction layers its weights do not hold (as
    transformers' DeepSeek-V3 and GLM-4.5 configs do by default)."""
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = n
    (src / "config.json").write_text(json.dumps(cfg))


def ragged_glm4_moe(mtp=0):
    """q 320 rows (160 per rank at tp 2), k/v 160 (80), dense ffn 640, experts of 160, q/k/v biases, q/k norms;
    ``mtp`` multi-token-prediction layers (HF layer 2 on)."""
    import transformers as tf
    return tf.Glm4MoeConfig(
        vocab_size=1003, hidden_size=320, intermediate_size=640, moe_intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=80, n_shared_experts=1, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, attention_bias=True,
        use_qk_norm=True, max_position_embeddings=256, num_nextn_predict_layers=mtp)


def ragged_qwen3_moe():
    """hidden 320, moe_intermediate 320: 160 gate/up rows and down columns per rank at etp=2; q 160 rows at tp=2."""
    import transformers as tf
    return tf.Qwen3MoeConfig(vocab_size=1003, hidden_size=320, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=80, max_position_embeddings=256, num_experts=4,
                             num_experts_per_tok=2, moe_intermediate_size=320, intermediate_size=640,
                             mlp_only_layers=[], decoder_sparse_step=1)


def export_hf(tmp_path: Path, cfg, world: int, args: list[str]):
    """Write ``cfg`` as an HF source under tmp_path, export it through the CLI on ``world`` ranks; (src, out, state)."""
    src, out = tmp_path / "src", tmp_path / "out"
    state = write_hf_source(src, cfg)
    r = torchrun(world, ["source.kind=hf", f"source.path={src}", f"output.dir={out}", *args])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return src, out, state


def edit_source_tensors(src: Path, name: str, edit) -> None:
    """Rewrite the safetensors file of an HF checkpoint that holds ``name``: ``edit(tensors)`` changes the dict of
    that file's tensors in place (e.g. deletes ``name`` or writes a NaN into it)."""
    from safetensors.torch import load_file
    index = json.loads((src / "model.safetensors.index.json").read_text())
    f = src / index["weight_map"][name]
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def drop_source_tensor(src: Path, name: str) -> None:
    """Remove tensor ``name`` from an HF checkpoint's safetensors (its index still lists it)."""
    edit_source_tensors(src, name, lambda tensors: tensors.pop(name))


def torchrun(nproc: int, args: list[str], script: str = "launch/export.py", timeout: int = 600,
             env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", script, *args]
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e)


def launch_nodes(cmds: list[list[str]], timeout: int = 300, env: dict | None = None) -> list[tuple[int, str, str]]:
    """Start one torchrun agent per command (the nodes of one job) at once; (returncode, stdout, stderr) of each."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    procs = [subprocess.Popen(c, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def private_mounts_reason() -> str | None:
    """Why a process cannot get a private mount namespace here (``unshare --mount``), or None when it can."""
    try:
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True)
    except FileNotFoundError:
        return "unshare (util-linux) is not installed"
    return None if r.returncode == 0 else f"unshare --mount is not permitted here: {r.stderr.strip()}"


def read_output(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    got = {}
    for name, f in index.items():
        with safe_open(str(out / f), "pt") as fh:
            got[name] = fh.get_tensor(name)
    return got


def mismatches(out: Path, source: dict[str, torch.Tensor], quantized: bool = True,
               scale_fmt: str = "amax") -> list[str]:
    """Names whose bytes differ from the single-process reference quantization, or from the source where the tensor
    stays unquantized; each with the reason when it is the wrong kind of tensor.

    quantized=True: every linear weight that config.json's ``modules_to_not_convert`` does not match must be F8_E4M3
    with its ``weight_scale_inv``, and every other tensor the source tensor unchanged. quantized=False: an unquantized
    export, where every tensor is the source tensor and config.json has no ``quantization_config``.
    """
    from megatron_fp8pb.quant.reference import quantize_blockfp8_reference
    from megatron_fp8pb.verify import is_linear_weight, module_of, should_convert_module
    got = read_output(out)
    qc = json.loads((out / "config.json").read_text()).get("quantization_config")
    bad = []
    if quantized != (qc is not None):
        bad.append(f"config.json quantization_config is {qc!r} in an export with quantized={quantized}")
    skip = (qc or {}).get("modules_to_not_convert") or []
    for name, t in got.items():
        if name.endswith(".weight_scale_inv"):
            w = name[:-len("_scale_inv")]
            if w not in got or got[w].dtype != torch.float8_e4m3fn:
                bad.append(f"{name} (a scale of a weight that is not fp8)")
                continue
            _, s = quantize_blockfp8_reference(source[w], scale_fmt=scale_fmt)
            if not torch.equal(t, s):
                bad.append(name)
            continue
        want_fp8 = (quantized and name in source and is_linear_weight(name, tuple(t.shape))
                    and should_convert_module(module_of(name), skip))
        if want_fp8 != (t.dtype == torch.float8_e4m3fn):
            want = torch.float8_e4m3fn if want_fp8 else source[name].dtype if name in source else "no tensor"
            bad.append(f"{name} ({t.dtype}, expected {want})")
        elif want_fp8:
            q, _ = quantize_blockfp8_reference(source[name], scale_fmt=scale_fmt)
            if name + "_scale_inv" not in got:
                bad.append(f"{name} (fp8 without weight_scale_inv)")
            elif not torch.equal(t.view(torch.uint8), q.view(torch.uint8)):
                bad.append(name)
        elif name not in source or t.dtype != source[name].dtype or not torch.equal(t, source[name]):
            bad.append(name)
    written = {n for n in got if not n.endswith("_scale_inv")}
    expected = set(source)
    if "lm_head.weight" in written and "lm_head.weight" not in expected:
        expected.add("lm_head.weight")
    bad += [f"missing {n}" for n in sorted(expected - written)]
    return bad


def output_digests(out: Path) -> dict[str, str]:
    """Every file of an export's output and its sha256, but the resolved config's (it records the layout and paths)."""
    from megatron_fp8pb.cli import RESOLVED_CONFIG
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(out).iterdir())
            if f.name != RESOLVED_CONFIG}
