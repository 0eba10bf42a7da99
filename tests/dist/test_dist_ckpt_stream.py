"""A Megatron distributed checkpoint streamed unit by unit through the real CLI (torchrun + gloo + megatron-core
0.16 on CPU): saved at one layout and exported at another, every tensor byte for byte the single-process reference
of the HF weights it was saved from, the same bytes as the reference path that loads the whole model, a peak RSS
that does not grow with the model's depth, and one-line refusals of checkpoints it cannot read."""
import re

import pytest
import torch
import transformers as tf

from helpers import RAGGED, claim_mtp_layers, mismatches, ragged_deepseek_v3, ragged_qwen3_moe, read_output, torchrun, write_hf_source


def _save(tmp_path, cfg, world: int, tp: int, pp: int = 1, ep: int = 1, *how: str, name: str = "mcore"):
    """An HF source of ``cfg`` and the Megatron dist checkpoint a job at tp/pp/ep saves of it (``how``: "singleton"
    saves every expert as its own tensor)."""
    src, ckpt = tmp_path / f"src_{name}", tmp_path / name
    state = write_hf_source(src, cfg)
    r = torchrun(world, ["save", str(src), str(ckpt), str(tp), str(pp), str(ep), *how],
                 script="tests/dist/dcp_worker.py")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return src, ckpt, state


def _export(src, ckpt, out, world: int, args: list[str]) -> str:
    r = torchrun(world, ["source.kind=megatron", f"source.path={ckpt}", f"source.hf_config={src}/config.json",
                         f"output.dir={out}", "output.verify=false", *args])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "streamed for" in r.stdout
    return r.stdout


def test_saved_at_tp1_exported_at_tp2(tmp_path):
    src, ckpt, state = _save(tmp_path, tf.LlamaConfig(**RAGGED), 1, tp=1)
    _export(src, ckpt, tmp_path / "out", 2, ["parallel.tp=2"])
    assert mismatches(tmp_path / "out", state) == []


def test_saved_at_tp2_exported_at_tp1_and_at_pp2(tmp_path):
    src, ckpt, state = _save(tmp_path, tf.Qwen3Config(tie_word_embeddings=True, **RAGGED), 2, tp=2)
    _export(src, ckpt, tmp_path / "tp1", 1, [])
    _export(src, ckpt, tmp_path / "pp2", 2, ["parallel.pp=2"])
    assert mismatches(tmp_path / "tp1", state) == []
    assert mismatches(tmp_path / "pp2", state) == []


def _different(a, b) -> list[str]:
    """Names whose dtype, shape or bytes differ between two exports."""
    got, want = read_output(a), read_output(b)
    assert sorted(got) == sorted(want)
    return [n for n in got if got[n].dtype != want[n].dtype or got[n].shape != want[n].shape or not torch.equal(
            got[n].reshape(-1).view(torch.uint8), want[n].reshape(-1).view(torch.uint8))]


def _check_resharded(tmp_path, src, ckpt, state, export: tuple[int, int, int]) -> None:
    """Export ``ckpt`` at ``export`` (tp, pp, ep) on 2 ranks: byte for byte the reference of ``state``, and the same
    files as megatron-core's own load of the whole model at that layout."""
    tp, pp, ep = export
    _export(src, ckpt, tmp_path / "out", 2, [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.ep={ep}"])
    assert mismatches(tmp_path / "out", state) == []
    r = torchrun(2, ["built", str(src), str(tmp_path / "built"), str(tp), str(pp), str(ep), str(ckpt)],
                 script="tests/dist/dcp_worker.py")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _different(tmp_path / "out", tmp_path / "built") == []


def _with_mtp(cfg):
    cfg.num_nextn_predict_layers = 1
    return cfg


@pytest.mark.parametrize("case", ["deepseek_v3", "qwen3_moe", "qwen3_moe_singleton_experts", "deepseek_v32",
                                  "glm_moe_dsa", "deepseek_v32_mtp"])
def test_moe_resharded_as_the_loaded_model(tmp_path, case):
    """DeepSeek-V3 (multi-latent attention, shared expert, expert bias, a multi-token-prediction layer) saved at ep=2
    exported at tp=2; Qwen3-MoE saved at tp=2 (experts split by etp=2) exported at ep=2, and saved at ep=2 with every
    expert its own tensor (content metadata ``singleton_local_shards``) exported at tp=2; DeepSeek-V3.2 and GLM-5
    (megatron-core's DSA indexer; GLM-5's shared indexers; DeepSeek-V3.2 with a multi-token-prediction layer, which
    holds an indexer of its own) saved at ep=2 exported at tp=2. All byte for byte the
    reference, and the same files as megatron-core's own load of the whole model at the export layout."""
    from megatron_fp8pb.sources.tiny import tiny_hf_config
    cfg, save, export = {"deepseek_v3": (ragged_deepseek_v3(), (1, 1, 2), (2, 1, 1)),
                         "qwen3_moe": (ragged_qwen3_moe(), (2, 1, 1), (1, 1, 2)),
                         "qwen3_moe_singleton_experts": (ragged_qwen3_moe(), (1, 1, 2, "singleton"), (2, 1, 1)),
                         "deepseek_v32": (tiny_hf_config("deepseek_v32"), (1, 1, 2), (2, 1, 1)),
                         "glm_moe_dsa": (tiny_hf_config("glm_moe_dsa"), (1, 1, 2), (2, 1, 1)),
                         "deepseek_v32_mtp": (_with_mtp(tiny_hf_config("deepseek_v32")), (1, 1, 2), (2, 1, 1))}[case]
    src, ckpt, state = _save(tmp_path, cfg, 2, *save)
    _check_readahead_plan(ckpt, cfg)
    _check_resharded(tmp_path, src, ckpt, state, export)


def _check_readahead_plan(ckpt, cfg) -> None:
    """The readahead's plan of a checkpoint megatron-core saved: its chunks as torch reads ``.metadata``, every
    weight chunk in the plan of one layout, split without overlap between two pipeline stages, and each routed
    expert's chunks in the plan of its expert-parallel rank only."""
    from torch.distributed.checkpoint import FileSystemReader
    from megatron_fp8pb.sources.distcp_layout import chunk_expert, chunk_layer, saved_chunks
    from megatron_fp8pb.sources.readahead import chunk_order, num_experts_of
    chunks = saved_chunks(ckpt)
    meta = FileSystemReader(str(ckpt)).read_metadata().storage_data
    assert {(c.key, c.offset, c.file.name, c.first_byte, c.length) for c in chunks} == {
        (i.fqn, tuple(i.offset or ()), s.relative_path, s.offset, s.length) for i, s in meta.items()}
    layers, experts = cfg.num_hidden_layers, num_experts_of(cfg.to_dict())
    weights = {c.name for c in chunks if "_extra_state" not in c.key}
    assert {c.name for c in chunk_order(chunks, layers)} == weights
    stages = [{c.name for c in chunk_order(chunks, layers, pp=2, pp_rank=r)} for r in (0, 1)]
    assert stages[0] | stages[1] == weights and not stages[0] & stages[1]
    ranks = [{c.name for c in chunk_order(chunks, layers, ep=2, ep_rank=r, num_experts=experts)} for r in (0, 1)]
    assert ranks[0] | ranks[1] == weights
    for c in chunks:
        at = chunk_layer(c.key, c.offset, layers)
        e = chunk_expert(c.key, c.offset, at[1]) if at else None
        if c.name in weights and e is not None:
            assert (c.name in ranks[0], c.name in ranks[1]) == (e < experts // 2, e >= experts // 2), c.name


def test_mtp_layers_the_checkpoint_lacks_are_left_out(tmp_path):
    """source.hf_config names an MTP layer that the Megatron checkpoint was saved without: exported without it, with
    a warning, byte for byte, and config.json says num_nextn_predict_layers 0."""
    import json
    src, ckpt, state = _save(tmp_path, ragged_deepseek_v3(mtp=0), 1, tp=1)
    claim_mtp_layers(src)
    r = torchrun(2, ["source.kind=megatron", f"source.path={ckpt}", f"source.hf_config={src}/config.json",
                     f"output.dir={tmp_path / 'out'}", "output.verify=false", "parallel.tp=2"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "holds none: exported without them" in r.stderr
    assert mismatches(tmp_path / "out", state) == []
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0


WIDE = dict(vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=8,
            max_position_embeddings=256)
# Measured (2 ranks, tp=2, CPU): the export adds ~69 MB at 2 layers, ~80-100 MB at 4 to 14 layers as rank 0's
# staging slabs come into use, and the same at 12 and 24 layers; the loaded model added 140 / 260 / 460 MB.
GROWTH = 32e6     # a rank's peak may grow by this while the checkpoint grows by ~300 MB (loaded whole: ~150 MB a rank)
BUDGET = 160e6    # what the export may add on any rank: staging slabs (3 x 64 MiB on rank 0) plus two units


def _peak_rss(tmp_path, layers: int) -> tuple[int, list[float]]:
    """A checkpoint of ``layers`` saved at tp=1, exported at tp=2: its bytes and the RSS the export added per rank."""
    src, ckpt, state = _save(tmp_path, tf.LlamaConfig(num_hidden_layers=layers, **WIDE), 1, tp=1, name=f"m{layers}")
    out = tmp_path / f"out{layers}"
    stdout = _export(src, ckpt, out, 2, ["parallel.tp=2"])
    assert mismatches(out, state) == []
    added = re.search(r"the export added: ([\d. ]+) GB", stdout).group(1)
    return sum(t.numel() * t.element_size() for t in state.values()), [float(x) * 1e9 for x in added.split()]


def test_peak_rss_flat_in_depth(tmp_path):
    small_bytes, small = _peak_rss(tmp_path, 12)
    big_bytes, big = _peak_rss(tmp_path, 24)
    assert big_bytes - small_bytes > 250e6
    growth = [b - s for b, s in zip(big, small)]
    print(f"peak RSS added per rank (MB): 12 layers {[round(x / 1e6) for x in small]}, "
          f"24 layers {[round(x / 1e6) for x in big]}")
    assert max(small + big) < BUDGET, f"the export added {[round(x / 1e6) for x in small + big]} MB"
    assert max(growth) < GROWTH, f"peak RSS per rank grew by {[g / 1e6 for g in growth]} MB for " \
                                 f"{(big_bytes - small_bytes) / 1e6:.0f} MB more checkpoint"


def test_refuses_what_it_cannot_read(tmp_path):
    """A checkpoint in another format, one whose saved chunks leave part of a tensor uncovered (an interrupted save),
    or one missing a data file is refused on every rank with one line, and nothing is written."""
    import pickle
    import shutil
    src, ckpt, _ = _save(tmp_path, tf.LlamaConfig(**RAGGED), 1, tp=1)
    zarr, holed = tmp_path / "zarr", tmp_path / "holed"
    shutil.copytree(ckpt, zarr)
    (zarr / "metadata.json").write_text('{"sharded_backend": "zarr", "sharded_backend_version": 1}')
    shutil.copytree(ckpt, holed)
    meta = pickle.loads((holed / ".metadata").read_bytes())
    chunks = meta.state_dict_metadata["decoder.layers.mlp.linear_fc2.weight"].chunks
    assert len(chunks) == 2    # one per layer
    chunks.pop()
    (holed / ".metadata").write_bytes(pickle.dumps(meta))
    lost = tmp_path / "lost"      # a data file gone: found when its first unit is read, mid-export
    shutil.copytree(ckpt, lost)
    (lost / "__0_0.distcp").unlink()
    for bad, says in ((zarr, "in the 'zarr' format"), (holed, "the checkpoint is incomplete"),
                      (lost, "FileNotFoundError")):
        out = tmp_path / f"out_{bad.name}"
        r = torchrun(2, ["source.kind=megatron", f"source.path={bad}", f"source.hf_config={src}/config.json",
                         f"output.dir={out}", "parallel.tp=2"])
        errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert r.returncode != 0 and len(errors) == 1 and says in errors[0], r.stderr[-3000:]
        assert "megatron_fp8pb/" not in r.stderr     # no traceback of ours
        assert not out.exists()
