"""A Megatron distributed checkpoint's chunk places read without torch (``sources/distcp_layout``), and the order the
readahead reads them in (``readahead.chunk_order``)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from megatron_fp8pb.sources import readahead
from megatron_fp8pb.sources.distcp_layout import SavedChunk, chunk_expert, chunk_layer, saved_chunks
from megatron_fp8pb.sources.readahead import chunk_order

ROOT = Path(__file__).resolve().parents[2]


def _save(path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    state = {"embedding.word_embeddings.weight": torch.randn(300, 64, generator=g).to(torch.bfloat16),
             "decoder.layers.0.mlp.linear_fc1.weight": torch.randn(256, 64, generator=g).to(torch.bfloat16),
             "decoder.final_layernorm.weight": torch.ones(64),
             "optimizer.state.step": torch.tensor(3), "iteration": 7}
    dcp.save(state, checkpoint_id=str(path), no_dist=True)


def test_saved_chunks_are_torchs_metadata(tmp_path):
    _save(tmp_path)
    want = {(i.fqn, tuple(i.offset or ())): (tmp_path / s.relative_path, s.offset, s.length)
            for i, s in FileSystemReader(str(tmp_path)).read_metadata().storage_data.items()}
    got = {(c.key, c.offset): (c.file, c.first_byte, c.length) for c in saved_chunks(tmp_path)}
    assert got == want and len(got) == 5


def test_saved_chunks_import_no_torch(tmp_path):
    _save(tmp_path)
    code = ("import sys; from megatron_fp8pb.sources.distcp_layout import saved_chunks; "
            f"c = saved_chunks({str(tmp_path)!r}); assert c and 'torch' not in sys.modules, sorted(sys.modules); "
            "print(len(c))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "5", r.stderr


def test_unreadable_metadata_gives_none(tmp_path):
    assert saved_chunks(tmp_path) is None
    (tmp_path / ".metadata").write_bytes(b"\x80\x04not a pickle")
    assert saved_chunks(tmp_path) is None


def test_layer_and_expert_of_a_key():
    assert chunk_layer("decoder.layers.self_attention.linear_qkv.weight", (5, 0, 0), 8) == (5, 1)     # stacked
    assert chunk_layer("decoder.layers.3.mlp.experts.experts.linear_fc1.weight", (2, 0, 0), 8) == (3, 0)
    assert chunk_layer("mtp.layers.0.transformer_layer.self_attention.linear_proj.weight", (0, 0), 8) == (8, 0)
    assert chunk_layer("embedding.word_embeddings.weight", (0, 0), 8) is None
    assert chunk_layer("optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight", (0, 0, 0), 8) is None
    assert chunk_expert("decoder.layers.mlp.experts.experts.linear_fc1.weight", (0, 6, 0, 0), 1) == 6
    assert chunk_expert("decoder.layers.3.mlp.experts.experts.linear_fc2.weight", (2, 0, 0), 0) == 2
    assert chunk_expert("decoder.layers.0.mlp.experts.experts.5.linear_fc1.weight_w", (0, 0), 0) == 5   # singleton
    assert chunk_expert("decoder.layers.mlp.shared_experts.linear_fc1.weight", (0, 0, 0), 1) is None
    assert chunk_expert("decoder.layers.mlp.router.weight", (0, 0, 0), 1) is None


def _chunks() -> list[SavedChunk]:
    """A checkpoint of 4 stacked layers (4 experts each, stacked) and one MTP layer, written by size as
    torch_dist writes: every layer's norms at the end of the files."""
    out, at = [], {"a": 0, "b": 0}

    def add(key, offset, n, f):
        out.append(SavedChunk(key, offset, Path(f), at[f], n))
        at[f] += n
    add("embedding.word_embeddings.weight", (0, 0), 1000, "a")
    add("output_layer.weight", (0, 0), 1000, "b")
    for layer in range(4):
        for e in range(4):
            add("decoder.layers.mlp.experts.experts.linear_fc1.weight", (layer, e, 0, 0), 300, "ab"[e % 2])
    for layer in range(4):
        add("decoder.layers.self_attention.linear_qkv.weight", (layer, 0, 0), 200, "ab"[layer % 2])
    add("mtp.layers.0.eh_proj.weight", (0, 0), 100, "a")
    for layer in range(4):
        add("decoder.layers.self_attention.linear_qkv.layer_norm_weight", (layer, 0), 2, "ab"[layer % 2])
        add("decoder.layers.self_attention.linear_qkv._extra_state/shard_0_4", (), 5, "a")
        add("optimizer.state.exp_avg.decoder.layers.self_attention.linear_qkv.weight", (layer, 0, 0), 400, "b")
    add("decoder.final_layernorm.weight", (0,), 2, "a")
    return out


def _unit(c: SavedChunk) -> str:
    at = chunk_layer(c.key, c.offset, 4)
    return f"layer {at[0]}" if at else "embedding" if c.key.startswith("embedding.") else "final"


def test_chunk_order_takes_units_as_the_export_does_and_only_weights():
    got = chunk_order(_chunks(), num_layers=4)
    units = [_unit(c) for c in got]
    firsts = [u for k, u in enumerate(units) if k == 0 or units[k - 1] != u]
    # the export's unit order: embedding, layer 0, the final norm + lm_head, the other layers, the MTP layer
    assert firsts == ["embedding", "layer 0", "final", "layer 1", "layer 2", "layer 3", "layer 4"]
    assert not any("_extra_state" in c.key or c.key.startswith("optimizer.") for c in got)
    assert len(got) == len([c for c in _chunks() if "_extra_state" not in c.key and "optimizer" not in c.key])
    layer0 = [c for c in got if _unit(c) == "layer 0"]
    assert layer0 == sorted(layer0, key=lambda c: (str(c.file), c.first_byte))     # within a unit: as they lie
    assert [c.key.split(".")[-1] for c in layer0 if c.file == Path("a")][-1] == "layer_norm_weight"     # its norm,
    # written near the end of file a, comes with its layer


def test_chunk_order_keeps_a_stages_layers_and_an_expert_ranks_experts():
    chunks = _chunks()
    first, last = chunk_order(chunks, 4, pp=2, pp_rank=0), chunk_order(chunks, 4, pp=2, pp_rank=1)
    assert {_unit(c) for c in first} == {"embedding", "layer 0", "layer 1"}
    assert {_unit(c) for c in last} == {"final", "layer 2", "layer 3", "layer 4"}
    e0, e1 = (chunk_order(chunks, 4, ep=2, ep_rank=r, num_experts=4) for r in (0, 1))
    experts = lambda cs: {c.offset[1] for c in cs if ".experts." in c.key}     # noqa: E731
    assert experts(e0) == {0, 1} and experts(e1) == {2, 3}
    assert [c for c in e0 if ".experts." not in c.key] == [c for c in e1 if ".experts." not in c.key]
    tied = [c for c in chunks if not c.key.startswith("output_layer.")]
    # a tied output layer: the last stage exports none, the first stage's embedding is the only one
    assert "embedding" not in {_unit(c) for c in chunk_order(tied, 4, pp=2, pp_rank=1)}


def test_command_line_readahead_reads_a_checkpoints_chunks(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("RANK", raising=False)
    _save(tmp_path / "ck")
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 1}')
    ra = readahead.start_for_command_line(None, ["source.kind=megatron", f"source.path={tmp_path}/ck",
                                                 f"source.hf_config={tmp_path}/config.json"])
    try:
        names = ra.order
        assert names == ["embedding.word_embeddings.weight@0,0", "decoder.layers.0.mlp.linear_fc1.weight@0,0",
                         "decoder.final_layernorm.weight@0"]
        deadline = time.time() + 10
        while not ra.finished and time.time() < deadline:
            time.sleep(0.01)
        assert ra.bytes_read == ra.total == sum(c.length for c in saved_chunks(tmp_path / "ck")
                                                if not c.key.startswith(("optimizer", "iteration")))
        assert readahead.start_checkpoint(tmp_path / "ck", 1) is ra     # the export finds it, done or not
        readahead.stop(tmp_path / "ck")
        again = readahead.start_checkpoint(tmp_path / "ck", 1)        # a stopped one is started again
        assert again is not ra and again.total == ra.total
    finally:
        readahead.stop(tmp_path / "ck")
