"""Expected refusals through the real CLI: one line from rank 0, the others silent, a non-zero exit, no traceback of
ours (FP8PB_DEBUG=1 brings it back), and every rank stops at once (no wait for a peer's timeout)."""
import os
import subprocess
import sys
import time

import transformers as tf

from helpers import RAGGED, ROOT, edit_source_tensors, torchrun, write_hf_source

OURS = ("megatron_fp8pb/", 'launch/export.py", line')     # frames of our code in a traceback


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def _timed(nproc, args, env=None):
    t0 = time.time()
    r = torchrun(nproc, args, env=env, timeout=120)
    return r, time.time() - t0


def test_existing_output_dir_one_line_fast_and_quiet(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    ok, base = _timed(2, ["parallel.tp=2", f"output.dir={tmp_path / 'fresh'}", "output.verify=false"])
    assert ok.returncode == 0, ok.stderr[-3000:]
    r, seconds = _timed(2, ["parallel.tp=2", f"output.dir={out}"])
    print(f"refusal latency through torchrun, 2 ranks: {seconds:.1f} s (a full tiny export: {base:.1f} s)")
    assert r.returncode != 0
    assert _errors(r.stderr) == [f"error: output.dir {out} exists and is not empty; choose another output.dir or "
                                 f"set output.overwrite=true"]
    assert not any(s in r.stderr for s in OURS), r.stderr
    assert "exitcode  : 2" in r.stderr and "<NO_OTHER_FAILURES>" in r.stderr     # torchrun names one process
    assert seconds < min(25.0, base + 10.0)      # no rank waits for a peer's 30 s shutdown
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_unwritable_parent_reaches_every_rank(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r, seconds = _timed(2, ["parallel.tp=2", f"output.dir={blocker / 'out'}"])
    assert r.returncode != 0 and seconds < 25.0
    [line] = _errors(r.stderr)
    assert "not a writable directory" in line and "rank" not in line


def test_debug_env_shows_the_traceback(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    r = torchrun(1, [f"output.dir={out}"], env={"FP8PB_DEBUG": "1"})
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "megatron_fp8pb/output/writer.py" in r.stderr and "FileExistsError" in r.stderr


def test_bad_key_and_layout_print_once_from_rank0(tmp_path):
    r = torchrun(2, ["parallel.tpp=2"])
    assert r.returncode != 0
    assert _errors(r.stderr) == ["error: unknown config key 'parallel.tpp'; known keys under parallel.: backend, "
                                 "device, ep, etp, pp, timeout_s, tp"]
    assert not any(s in r.stderr for s in OURS)
    r = torchrun(2, ["parallel.tp=4", f"output.dir={tmp_path / 'o'}"])
    [line] = _errors(r.stderr)
    assert "world size(2) % (tp(4) * pp(1))" in line
    r = torchrun(2, ["parallel.pp=2", "source.num_layers=3", f"output.dir={tmp_path / 'o'}"])
    assert _errors(r.stderr) == ["error: impossible parallel layout: num_hidden_layers(3) % pp(2) = 1 != 0. The "
                                 "export's layout need not be the one the model was trained or saved at: choose "
                                 "parallel.tp/pp/ep/etp that divide these sizes (1 always does)"]


def test_missing_source_path_says_it_does_not_exist(tmp_path):
    r = torchrun(2, ["source.kind=hf", f"source.path={tmp_path / 'nope'}", "parallel.tp=2"])
    assert r.returncode != 0
    assert _errors(r.stderr) == [f"error: source.path {tmp_path / 'nope'} does not exist; point it at an HF "
                                 f"checkpoint directory"]


def test_nan_names_the_hf_tensor_and_its_index_rank_once(tmp_path):
    src = tmp_path / "src"
    write_hf_source(src, tf.LlamaConfig(**RAGGED))
    name = "model.layers.1.mlp.up_proj.weight"
    edit_source_tensors(src, name, lambda tensors: tensors[name].__setitem__((7, 11), float("nan")))
    r = torchrun(2, ["source.kind=hf", f"source.path={src}", "parallel.tp=2", f"output.dir={tmp_path / 'out'}"])
    assert r.returncode != 0
    [line] = _errors(r.stderr)
    assert f"HF tensor '{name}' [704, 320] holds nan at index [7, 11]" in line, line
    assert "Megatron parameter decoder.layers.1.mlp.linear_fc1.weight" in line
    assert line.count("rank") == 1 and line.startswith("error: rank 0")
    assert not (tmp_path / "out").exists()


def test_help_lists_every_key_once_under_torchrun():
    from megatron_fp8pb.config import describe_keys
    r = torchrun(2, ["--help"])
    assert r.returncode == 0
    assert r.stdout.count("usage: megatron-fp8pb-export") == 1
    for key, default, meaning in describe_keys():
        assert f"{key}={default}" in r.stdout and meaning
    assert "quant.serve_tp=none" in r.stdout and "output.overwrite=false" in r.stdout


def test_export_local_counts_processes_from_the_resolved_layout(tmp_path):
    env = dict(os.environ, FP8PB_PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run(["bash", str(ROOT / "launch" / "export_local.sh"), "--config",
                        str(ROOT / "configs" / "llama3-8b-tp8.yaml"), "parallel.tp=2",
                        f"source.path={tmp_path / 'no-such-ckpt'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "export_local: 2 process(es) on this node" in r.stderr       # the file says 8 GPUs, for tp=8
    assert r.returncode != 0
    assert _errors(r.stderr) == [f"error: source.path {tmp_path / 'no-such-ckpt'} does not exist; point it at an "
                                 f"HF checkpoint directory"]
    # launch/torchrun.py ends with one line instead of torchrun's traceback and failure table
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr
    assert r.stderr.splitlines()[-1].endswith("failed: rank 0 exited with code 2; its message is above")


def test_a_normal_run_shows_no_known_harmless_warnings(tmp_path):
    from helpers import free_port
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", "launch/export.py", "parallel.tp=2",
                        f"output.dir={tmp_path / 'out'}", "output.verify=false"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Warning" not in r.stderr and "Apex" not in r.stderr, r.stderr      # megatron-core's 14 at import
