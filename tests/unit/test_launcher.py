"""How megatron-fp8pb-export decides what it is: a rank under torchrun, a rank Slurm numbered, or the launcher."""
from megatron_fp8pb import launcher


def test_under_torchrun_it_is_the_rank_it_was_given():
    assert launcher.under_launcher({"RANK": "3", "WORLD_SIZE": "8", "MASTER_ADDR": "node1"})
    assert not launcher.under_launcher({"RANK": "3"})           # a stray RANK alone is no launcher


def test_a_slurm_task_becomes_the_rank_slurm_numbered(monkeypatch):
    env = {"SLURM_PROCID": "9", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[03-04]"}
    monkeypatch.setattr(launcher, "_first_host", lambda nodelist: "gpu03")
    got = launcher.slurm_rank_env(env)
    assert got == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "gpu03", "MASTER_PORT": str(20000 + 4242 % 20000)}
    assert launcher.slurm_rank_env(dict(env, MASTER_ADDR="10.0.0.1", MASTER_PORT="1234"))["MASTER_ADDR"] == "10.0.0.1"
    assert launcher.slurm_rank_env({"SLURM_JOB_ID": "1"}) is None      # inside an allocation but not a step


def test_the_fewest_ranks_a_layout_needs():
    assert launcher.min_world(2, 1) == 2 and launcher.min_world(2, 2, 4, 1) == 8 and launcher.min_world(4, 1, 2) == 8
