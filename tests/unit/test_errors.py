"""How an expected error leaves a process: who prints the one line, and which exit code torchrun sees."""
import json

import pytest

from megatron_fp8pb import process
from megatron_fp8pb.errors import EXIT_REFUSED, Refusal, is_expected
from megatron_fp8pb.process import cli, exit_code_for
from megatron_fp8pb.faults import ExportError, stage


def _as(monkeypatch, rank, local_rank, local_world=1):
    for k, v in (("RANK", rank), ("LOCAL_RANK", local_rank), ("LOCAL_WORLD_SIZE", local_world)):
        monkeypatch.setenv(k, str(v))
    monkeypatch.setattr(process.time, "sleep", lambda s: None)


@pytest.mark.parametrize("rank,local_rank,printed,code", [(0, 0, True, EXIT_REFUSED), (1, 1, False, 0),
                                                          (8, 0, False, EXIT_REFUSED), (9, 1, False, 0)])
def test_an_everywhere_refusal_is_shown_by_rank0_and_fails_each_node_once(monkeypatch, capsys, rank, local_rank,
                                                                          printed, code):
    _as(monkeypatch, rank, local_rank, 8)
    assert exit_code_for(Refusal("output.dir /x exists", everywhere=True)) == code
    assert (capsys.readouterr().err == "error: output.dir /x exists\n") == printed


def test_a_local_error_is_shown_by_its_rank(monkeypatch, capsys):
    _as(monkeypatch, 3, 1, 2)
    assert exit_code_for(KeyError("unknown config key 'x.y'")) == EXIT_REFUSED
    assert capsys.readouterr().err == "error: unknown config key 'x.y'\n"     # no extra quotes of str(KeyError)


def test_stage_wraps_bad_values_as_refusals_from_the_original(monkeypatch):
    with pytest.raises(Refusal, match=r"^rank 1, stage plan: Expecting property name") as info:
        with stage("plan", 1):
            json.loads("{not json")
    assert isinstance(info.value.__cause__, json.JSONDecodeError)            # not turned into another type
    with pytest.raises(ExportError) as info:
        with stage("write", 1):
            raise OSError(28, "No space left on device")
    assert is_expected(info.value)
    with pytest.raises(ExportError) as info:
        with stage("transfer", 1):
            raise AttributeError("a bug")
    assert not is_expected(info.value)


def test_debug_reraises_and_bugs_always_do(monkeypatch):
    _as(monkeypatch, 0, 0)

    def refuse():
        raise Refusal("bad layout", everywhere=True)

    assert cli(refuse) == EXIT_REFUSED
    monkeypatch.setenv("FP8PB_DEBUG", "1")
    with pytest.raises(Refusal):
        cli(refuse)
    monkeypatch.delenv("FP8PB_DEBUG")
    with pytest.raises(ZeroDivisionError):
        cli(lambda: 1 / 0)


def test_interrupted_line_says_what_state_the_output_is_in(tmp_path):
    process.set_phase("exporting", partial=tmp_path / "out.partial")
    assert process.interrupted_line() == "interrupted while exporting; nothing was written"
    process.set_phase("verifying", complete=tmp_path / "out")
    line = process.interrupted_line()
    assert line.startswith(f"interrupted while verifying: the checkpoint {tmp_path / 'out'} is complete")
    assert f"python -m megatron_fp8pb.verify {tmp_path / 'out'}" in line
    assert process.STATE.partial is None        # a complete checkpoint is never removed
    process.STATE.complete = None
