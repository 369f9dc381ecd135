"""The launch plan: placement, ports, memory check, sbatch rendering — no cluster needed."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from deepeyes.config import register_configs, to_object
from deepeyes.launch.plan import (
    NOT_ESTIMATED, PORT_RANGE, SANDBOX_SESSION_GB, TRAJECTORY_BYTES_PER_TOKEN, LaunchPlan, build_plan,
)
from tests.paths import CONF_DIR, REPO, TOY_RL


def job_config(*overrides, job="rl"):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        toy = TOY_RL if job == "rl" else ()
        return to_object(compose(job, overrides=["run.out_dir=unused", *toy, *overrides]))


def test_two_nodes_put_the_trainer_on_the_first_and_rollout_engines_on_the_second(tmp_path):
    plan = build_plan("rl", job_config("cluster=slurm", "nodes=2"), tmp_path)
    assert [r.name for r in plan.roles_on(0)] == ["trainer", "search", "sandbox"]
    assert [r.name for r in plan.roles_on(1)] == ["rollout"] * 8 + ["sandbox"]
    trainer, rollout = plan.roles_on(0)[0], plan.roles_on(1)[0]
    assert trainer.main and trainer.gpus == list(range(8)) and not trainer.serves
    assert rollout.ready and "{port}" in rollout.command
    # every node's daemon is reachable from the trainer (token-checked): sessions spread over all of them
    assert all(not r.node_local and "{host}" in r.command for r in plan.roles if r.name == "sandbox")


def test_every_rollout_gpu_generates_in_one_engine_per_tensor_parallel_slice(tmp_path):
    plan = build_plan("rl", job_config("cluster=slurm", "nodes=3", "rollout=vllm", "rollout.tensor_parallel=2"), tmp_path)
    engines = [(r.node, r.gpus) for r in plan.roles if r.name == "rollout"]
    assert engines == [(node, gpus) for node in (1, 2) for gpus in ([0, 1], [2, 3], [4, 5], [6, 7])]
    ports = [r.port_offset for r in plan.roles if r.name == "rollout"]
    assert len(set(ports)) == len(ports), "every engine is its own server on its own port"
    assert plan.describe().count("--tensor-parallel 2") == 8
    with pytest.raises(ValueError, match="rollout.tensor_parallel=3 does not divide the 8 GPUs"):
        build_plan("rl", job_config("cluster=slurm", "nodes=2", "rollout.tensor_parallel=3"), tmp_path)


def test_the_judge_takes_one_engine_slot_of_gpus(tmp_path):
    plan = build_plan("rl", job_config("cluster=slurm", "nodes=3", "rollout=vllm", "rollout.tensor_parallel=4",
                                       "reward=deepeyesv2_judge"), tmp_path)
    assert [(r.name, r.node, r.gpus) for r in plan.roles if r.name in ("rollout", "judge")] == [
        ("rollout", 1, [0, 1, 2, 3]), ("rollout", 1, [4, 5, 6, 7]), ("rollout", 2, [0, 1, 2, 3]),
        ("judge", 2, [4, 5, 6, 7]),
    ]
    judge = next(r for r in plan.roles if r.name == "judge")
    assert judge.command[judge.command.index("--tensor-parallel") + 1] == "4"
    with pytest.raises(ValueError, match="judge.enabled=true takes 8 GPUs .reward.judge.tensor_parallel. and leaves no engine"):
        build_plan("rl", job_config("cluster=slurm", "nodes=2", "rollout.tensor_parallel=8", "reward=deepeyesv2_judge"),
                   tmp_path)
    # A judge larger than a rollout engine (the release's 72B judge on 4 GPUs beside TP=1 engines):
    # the engines it overlaps give their GPUs to it, and its server gets its own tensor parallelism.
    plan = build_plan("rl", job_config("cluster=slurm", "nodes=3", "rollout=vllm", "rollout.tensor_parallel=1",
                                       "reward=deepeyesv2_judge", "reward.judge.tensor_parallel=4"), tmp_path)
    engines = [(r.node, r.gpus) for r in plan.roles if r.name == "rollout"]
    assert engines == [(1, [g]) for g in range(8)] + [(2, [g]) for g in range(4)]
    judge = next(r for r in plan.roles if r.name == "judge")
    assert (judge.node, judge.gpus) == (2, [4, 5, 6, 7])
    assert judge.command[judge.command.index("--tensor-parallel") + 1] == "4"
    # A judge whose checkpoint this machine cannot read (a login node without the shared
    # filesystem): the plan says its GPU memory is not estimated rather than printing nothing.
    plan = build_plan("rl", job_config("cluster=slurm", "nodes=3", "rollout=vllm", "reward=deepeyesv2_judge",
                                       f"reward.judge.model={tmp_path / 'absent-72b'}"), tmp_path)
    judge = next(r for r in plan.roles if r.name == "judge")
    assert judge.gpu_memory == NOT_ESTIMATED and NOT_ESTIMATED in plan.describe()


def test_one_node_shares_it_with_rollout_engines_and_the_judge(tmp_path):
    plan = build_plan("rl", job_config("cluster=slurm", "reward.judge.enabled=true"), tmp_path)
    assert [r.name for r in plan.roles] == ["trainer", "rollout", "rollout", "rollout", "search", "judge", "sandbox"]
    assert {r.node for r in plan.roles} == {0}
    assert next(r for r in plan.roles if r.name == "judge").gpus == [7]


def test_one_node_splits_its_gpus_between_the_trainer_and_the_rollout_engines(tmp_path):
    plan = build_plan("rl", job_config("cluster=slurm", "rollout.tensor_parallel=2"), tmp_path)
    assert [(r.name, r.gpus) for r in plan.roles if r.name in ("trainer", "rollout")] == [
        ("trainer", [0, 1, 2, 3]), ("rollout", [4, 5]), ("rollout", [6, 7]),
    ]
    three = build_plan("rl", job_config("cluster=slurm", "nodes=3", "cluster.gpus_per_node=1"), tmp_path)
    assert [(r.name, r.node) for r in three.roles if r.name in ("trainer", "rollout")] == [
        ("trainer", 0), ("rollout", 1), ("rollout", 2),
    ]
    cpu = build_plan("rl", job_config("cluster=slurm", "cluster.gpus_per_node=0", "rollout.servers=2"), tmp_path)
    assert [(r.name, r.gpus) for r in cpu.roles if r.name == "rollout"] == [("rollout", []), ("rollout", [])]


def test_ports_never_collide_within_a_job_nor_between_neighbouring_jobs(tmp_path):
    cfg = job_config(
        "cluster=slurm", "nodes=4",
        "cluster.extra_roles=[{name: extra, command: [x]}, {name: once, command: [y], every_node: false}]",
    )
    plan = build_plan("rl", cfg, tmp_path)
    assert plan.ports_per_job == 100
    for job_id in (7, 8, 207):
        ports = [plan.port(r, job_id) for r in plan.roles if r.serves] + [plan.rendezvous_port(job_id)]
        assert len(ports) == len(set(ports))
    assert {r.node for r in plan.roles if r.name == "extra"} == {0, 1, 2, 3}
    assert [r.node for r in plan.roles if r.name == "once"] == [0]
    many = build_plan("rl", job_config("cluster=slurm", "nodes=17", "cluster.gpus_per_node=8"), tmp_path)
    assert many.ports_per_job == 200  # 128 engines and 17 sandboxes take more than 100 ports
    for job_id in (7, 8, 107):
        ports = [many.port(r, job_id) for r in many.roles if r.serves] + [many.rendezvous_port(job_id)]
        assert len(ports) == len(set(ports)) and max(ports) < many.port_base + PORT_RANGE
    assert many.port(many.roles[-1], 8) < many.port(many.roles[1], 9)


def test_memory_below_the_estimate_is_refused_with_the_key_to_change(tmp_path):
    cfg = job_config("cluster=slurm", "cluster.gpus_per_node=0", "model=qwen2_5_vl_7b", "model.path=/m", "cluster.mem_gb=64")
    with pytest.raises(ValueError, match=r"cluster.mem_gb=64 is below the estimated \d+ GB that node 0 needs"):
        build_plan("rl", cfg, tmp_path)
    assert build_plan("rl", job_config("cluster=slurm", "cluster.mem_gb=64"), tmp_path).mem_gb == 64


def test_impossible_plans_are_refused(tmp_path):
    with pytest.raises(ValueError, match="trainer_nodes=1 and cluster.rollout_nodes=2 do not fit nodes=2"):
        build_plan("rl", job_config("cluster=slurm", "nodes=2", "cluster.rollout_nodes=2"), tmp_path)
    with pytest.raises(ValueError, match="extra_roles: every role needs a name and a command"):
        build_plan("rl", job_config("cluster=slurm", "cluster.extra_roles=[{name: x}]"), tmp_path)


def test_the_plan_survives_its_json_form(tmp_path):
    plan = build_plan("rl", job_config("cluster=slurm", "nodes=3"), tmp_path)
    assert LaunchPlan.from_json(plan.to_json()) == plan


def test_sft_has_no_rollout_servers_and_trains_on_every_node(tmp_path):
    plan = build_plan("sft", job_config("cluster=slurm", "nodes=2", job="sft"), tmp_path)
    assert [(r.name, r.node, r.first_rank, r.world_size) for r in plan.roles] == [
        ("trainer", 0, 0, 16), ("trainer", 1, 8, 16),
    ]
    reference = build_plan("sft", job_config("cluster=slurm", "trainer=hf", job="sft"), tmp_path)
    assert [(r.name, r.processes) for r in reference.roles] == [("trainer", 1)]
    with pytest.raises(ValueError, match="trainer_nodes=2 needs trainer=megatron"):
        build_plan("sft", job_config("cluster=slurm", "nodes=2", "trainer=hf", job="sft"), tmp_path)


def test_dry_run_prints_the_plan_and_the_sbatch_script_and_submits_nothing(tmp_path):
    # Anywhere: a laptop or a login node without Slurm's client (no sbatch, no srun on PATH).
    no_slurm = str(Path(sys.executable).parent)
    assert shutil.which("srun", path=no_slurm) is None and shutil.which("sbatch", path=no_slurm) is None
    result = subprocess.run(
        [sys.executable, "jobs/rl.py", *TOY_RL, "cluster=slurm", "nodes=2", "cluster.dry_run=true", "cluster.partition=gpu",
         "cluster.account=vision", "+cluster.sbatch_extra.exclusive=''", "cluster.container_image=/images/deepeyes.sif",
         "cluster.container_binds=[/shared,/scratch]", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "PATH": no_slurm},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "launch plan: rl on 2 node(s)" in out and "trainer" in out and "rollout" in out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=vision", "#SBATCH --exclusive",
                 "#SBATCH --requeue", "#SBATCH --signal=USR2@90", "#SBATCH --mem=0", "--kill-on-bad-exit=1",
                 "apptainer exec --nv --bind /shared,/scratch /images/deepeyes.sif python3 -m deepeyes.launch.agent"):
        assert line in out
    launch_dir = Path(tmp_path) / "launch"
    assert (launch_dir / "job.sbatch").read_text() in out
    assert "#   node 1: 16 CPUs" in out and out.count("#     rollout") == 8  # the plan, in the script too
    assert not (launch_dir / "submitit").exists()
    assert (launch_dir / "service_token").stat().st_mode & 0o077 == 0


def test_a_typo_fails_at_composition_before_anything_is_planned(tmp_path):
    result = subprocess.run(
        [sys.executable, "jobs/rl.py", "cluster=slurm", "grpo.stepz=3", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "stepz" in result.stderr
    assert not (Path(tmp_path) / "launch").exists()


def test_the_megatron_trainer_runs_one_rank_per_gpu_and_the_reference_one_process(tmp_path):
    megatron = build_plan("rl", job_config("cluster=slurm", "nodes=2", "trainer=megatron", "trainer.tensor_parallel=2"),
                          tmp_path)
    assert [(r.name, r.processes) for r in megatron.roles_on(0)] == [("trainer", 8), ("search", 1), ("sandbox", 1)]
    assert "x8 ranks" in megatron.describe()
    reference = build_plan("rl", job_config("cluster=slurm", "nodes=2", "trainer=hf"), tmp_path)
    assert reference.roles_on(0)[0].processes == 1
    cpu_only = build_plan("rl", job_config("cluster=slurm", "trainer=megatron", "cluster.gpus_per_node=0"), tmp_path)
    assert cpu_only.roles_on(0)[0].processes == 1
    with pytest.raises(ValueError, match=r"tensor_parallel x trainer.pipeline_parallel = 3 does not divide the 8"):
        build_plan("rl", job_config("cluster=slurm", "nodes=2", "trainer=megatron", "trainer.tensor_parallel=3"), tmp_path)


def test_rl_trains_on_the_first_trainer_nodes_and_serves_rollouts_on_the_rest(tmp_path):
    plan = build_plan("rl", job_config("cluster=slurm", "nodes=4", "cluster.trainer_nodes=2", "cluster.gpus_per_node=2"),
                      tmp_path)
    trainers = [(r.node, r.processes, r.first_rank, r.world_size) for r in plan.roles if r.name == "trainer"]
    assert trainers == [(0, 2, 0, 4), (1, 2, 2, 4)]
    assert [r.node for r in plan.roles if r.name == "rollout"] == [2, 2, 3, 3]  # one engine per GPU
    with pytest.raises(ValueError, match="trainer_nodes=3 and cluster.rollout_nodes=2 do not fit nodes=4"):
        build_plan("rl", job_config("cluster=slurm", "nodes=4", "cluster.trainer_nodes=3", "cluster.rollout_nodes=2"),
                   tmp_path)


def test_the_memory_estimate_follows_the_measured_image_path_costs(tmp_path):
    def memory(*overrides):
        # host memory only: a GPU as large as the reference trainer needs for 7B
        cfg = job_config("cluster=slurm", "nodes=2", "cluster.gpus_per_node=8", "trainer=hf", "model=qwen2_5_vl_7b",
                         "model.path=/m", "grpo.prompts_per_step=256", "rollout.n=16", "rollout.max_response_tokens=16384",
                         "cluster.gpu_memory_gb=1000", *overrides)
        plan = build_plan("rl", cfg, tmp_path)
        return {(r.node, r.name): r.memory_gb for r in plan.roles}

    paper = memory()  # 256 prompts x 16 rollouts, responses up to 16384 tokens
    trajectory_gb = (1024 + 4194304 // 784 + 16384) * TRAJECTORY_BYTES_PER_TOKEN / 1e9  # text, trajectory images, response
    twice = memory("grpo.prompts_per_step=512")
    assert twice[0, "trainer"] - paper[0, "trainer"] == pytest.approx(256 * 16 * trajectory_gb)
    cache = memory("model.pixel_cache_mb=2048")  # the 7B config keeps 1024 MB
    assert cache[0, "trainer"] - paper[0, "trainer"] == pytest.approx(1.0)
    assert cache[1, "rollout"] - paper[1, "rollout"] == pytest.approx(1.0)
    sessions = memory("tools.code.max_sessions=128")
    assert sessions[0, "sandbox"] - paper[0, "sandbox"] == pytest.approx(64 * SANDBOX_SESSION_GB)


def test_only_the_trainer_and_extra_roles_inherit_the_jobs_environment_and_search_names_its_key(tmp_path, monkeypatch):
    monkeypatch.setenv("SERPAPI_API_KEY", "x")
    plan = build_plan("rl", job_config("cluster=slurm", "nodes=2", "tools.search_backend=serpapi",
                                       "+cluster.extra_roles=[{name: probe, command: [true]}]"), tmp_path)
    inheriting = {r.name for r in plan.roles if r.inherit_environment}
    assert inheriting == {"trainer", "probe"}
    assert {r.name: r.secrets for r in plan.roles if r.secrets} == {"search": ["SERPAPI_API_KEY"]}
    local = build_plan("rl", job_config("cluster=slurm", "nodes=2"), tmp_path)
    assert not any(r.secrets for r in local.roles)


def test_on_slurm_the_cold_start_is_found_before_queueing_and_the_nodes_load_it(tmp_path, monkeypatch):
    """The embedded default starts from the tiny model's cold start (minutes of SFT, built by
    deepeyes.train.cold_start: tests/train/test_cold_start.py). The launcher asks for it before
    the job is queued and hands the nodes its path; here the cache answers with a model directory."""
    from deepeyes.launch.launcher import _cold_start_before_queueing
    from deepeyes.model import ensure_tiny_model

    cold_start = tmp_path / "cold-start"
    cold_start.symlink_to(ensure_tiny_model())
    monkeypatch.setattr("deepeyes.train.cold_start.ensure_cold_start_checkpoint", lambda: cold_start)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("rl", overrides=["run.out_dir=unused", "cluster=slurm", "nodes=2", "rollout=hf"])
        given = compose("rl", overrides=["run.out_dir=unused", "cluster=slurm", "run.init_from=/runs/sft"])
    typed = to_object(cfg)
    _cold_start_before_queueing(cfg, typed)
    assert cfg.model.path == typed.model.path == str(cold_start)
    rollout = next(r for r in build_plan("rl", typed, tmp_path).roles if r.name == "rollout")
    assert rollout.command[rollout.command.index("--model") + 1] == str(cold_start)
    typed = to_object(given)
    _cold_start_before_queueing(given, typed)  # the job starts from its own checkpoint
    assert given.model.path is None and typed.model.path is None
