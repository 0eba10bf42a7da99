"""A dense GPT's Megatron distributed checkpoint read without megatron-core (``sources/megatron_plain``), through the
real CLI (torchrun + gloo): saved by megatron-core at one layout, exported at another, byte for byte the reference
of the HF weights it was saved from and the same files as the export that maps it with megatron-core; and exported
where megatron-core cannot be imported at all."""
import pytest
import torch
import transformers as tf

from helpers import RAGGED, ROOT, mismatches, read_output, torchrun, write_hf_source


def _save(tmp_path, cfg, tp: int, pp: int):
    src, ckpt = tmp_path / "src", tmp_path / "mcore"
    state = write_hf_source(src, cfg)
    r = torchrun(2 if tp * pp == 1 else tp * pp, ["save", str(src), str(ckpt), str(tp), str(pp), "1"],
                 script="tests/dist/dcp_worker.py")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return src, ckpt, state


def _export(src, ckpt, out, args: list[str], env: dict | None = None) -> str:
    r = torchrun(2, ["source.kind=megatron", f"source.path={ckpt}", f"source.hf_config={src}/config.json",
                     f"output.dir={out}", "output.verify=false", *args], env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def _same_files(a, b) -> bool:
    got, want = read_output(a), read_output(b)
    return sorted(got) == sorted(want) and all(
        got[n].dtype == want[n].dtype and got[n].shape == want[n].shape
        and torch.equal(got[n].reshape(-1).view(torch.uint8), want[n].reshape(-1).view(torch.uint8)) for n in got)


@pytest.mark.parametrize("case", ["qwen2_tp2_to_pp2", "llama_pp2_to_tp2", "qwen3_tied_tp1_to_tp2"])
def test_read_directly_is_the_reference_and_megatron_cores_reading(tmp_path, case):
    """Qwen2 (q/k/v biases), Llama and a tied Qwen3 (q/k norms), every shard size off the 128 grid (RAGGED), saved
    and exported at different layouts."""
    cfg, save, export = {
        "qwen2_tp2_to_pp2": (tf.Qwen2Config(**RAGGED), (2, 1), ["parallel.pp=2"]),
        "llama_pp2_to_tp2": (tf.LlamaConfig(**RAGGED), (1, 2), ["parallel.tp=2"]),
        "qwen3_tied_tp1_to_tp2": (tf.Qwen3Config(tie_word_embeddings=True, **RAGGED), (1, 1), ["parallel.tp=2"]),
    }[case]
    src, ckpt, state = _save(tmp_path, cfg, *save)
    log = _export(src, ckpt, tmp_path / "direct", export)
    assert "read without megatron-core" in log
    assert mismatches(tmp_path / "direct", state) == []
    log = _export(src, ckpt, tmp_path / "mcore_out", export + ["source.megatron_core=true"])
    assert "read without megatron-core" not in log
    assert _same_files(tmp_path / "direct", tmp_path / "mcore_out")


def test_exports_where_megatron_core_cannot_be_imported(tmp_path):
    src, ckpt, state = _save(tmp_path, tf.LlamaConfig(**RAGGED), 2, 1)
    block = tmp_path / "no_megatron" / "megatron"
    block.mkdir(parents=True)
    (block / "__init__.py").write_text("raise ImportError('megatron-core is not installed here')\n")
    import os
    path = os.pathsep.join([str(block.parent), str(ROOT), os.environ.get("PYTHONPATH", "")])
    _export(src, ckpt, tmp_path / "out", ["parallel.tp=2"], env={"PYTHONPATH": path})
    assert mismatches(tmp_path / "out", state) == []


def test_ranks_that_decide_differently_all_use_megatron_core(tmp_path):
    """The command line decides per rank from the checkpoint's files whether megatron-core is needed; where one rank
    says yes (a file it could not read), every rank starts megatron-core's parallel state."""
    script = tmp_path / "agree.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from megatron_fp8pb.config import ParallelConfig\n"
        "from megatron_fp8pb.parallel import session\n"
        "rank = int(os.environ['RANK'])\n"
        "cfg = ParallelConfig(tp=2, backend='gloo', device='cpu', timeout_s=60)\n"
        "with session.started(cfg, megatron=rank == 1, agreed=True) as s:\n"
        "    from megatron.core import parallel_state as ps\n"
        "    print(f'RANK{rank} megatron={s.megatron} tp={ps.get_tensor_model_parallel_world_size()}')\n")
    r = torchrun(2, [], script=str(script))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "RANK0 megatron=True tp=2" in r.stdout and "RANK1 megatron=True tp=2" in r.stdout
