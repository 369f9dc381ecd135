"""Jobs on the real local Slurm cluster: two nodes, preemption and exact resume, a sweep as an
array, a failing health check, and configs refused before anything is queued."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.paths import REPO, TOY_RL
from tests.wandb_files import history, run_groups

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

SMALL_RL = [
    *TOY_RL, "grpo.steps=3", "grpo.prompts_per_step=2", "rollout.n=2", "rollout.max_turn_tokens=32", "model.threads=1",
    "cluster.gpus_per_node=2", "cluster.cpus_per_node=2",
]


def rl_command(out_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "jobs/rl.py", "cluster=slurm", "cluster.wait=true", *SMALL_RL, *overrides,
            f"hydra.run.dir={out_dir}"]


def run_rl(out_dir: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(rl_command(out_dir, *overrides), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def node_summaries(out_dir: Path) -> dict[int, dict]:
    return {s["node"]: s for s in map(json.loads, map(Path.read_text, (out_dir / "launch").glob("run_*/node_*.json")))}


def learning_metrics(out_dir: Path) -> dict[int, dict]:
    """Per step (the last record of each, as a resumed run appends), everything but wall times."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: {k: v for k, v in row.items() if not k.startswith("timing/")} for row in rows}


def queued_jobs() -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout.split()


def preempt_after_first_step(process: subprocess.Popen, out_dir: Path, job_id_file: Path) -> str:
    """Once `out_dir` has logged its first step, send its Slurm job the warning signal that comes
    before a time limit or preemption (what `--signal=USR2@90` sends); the process's output."""
    deadline = time.monotonic() + 300
    metrics = out_dir / "metrics.jsonl"
    while not metrics.exists() or not metrics.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the job ended or stalled before step 1:\n{process.communicate()[0][-4000:]}")
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", job_id_file.read_text()], check=True)
    return process.communicate(timeout=400)[0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """`python jobs/rl.py cluster=slurm nodes=2`, run to the end: the reference for resumption."""
    out_dir = tmp_path_factory.mktemp("rl_2_nodes")
    result = run_rl(out_dir, "nodes=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out_dir, result


def test_rl_on_two_nodes_places_roles_on_both(uninterrupted):
    out_dir, result = uninterrupted
    nodes = node_summaries(out_dir)
    assert sorted(nodes) == [0, 1]
    assert [nodes[0]["slurmd_nodename"], nodes[1]["slurmd_nodename"]] == ["n1", "n2"]
    assert "trainer" in nodes[0]["roles"] and nodes[0]["trainer_exit_code"] == 0
    # the default trainer (megatron) runs one rank per trainer GPU: two here
    assert [p.name for p in sorted((out_dir / "launch").glob("run_*/trainer_node0*.log"))] == [
        "trainer_node0.log", "trainer_node0_rank1.log",
    ]
    assert nodes[0]["roles"] == ["trainer", "search", "sandbox"]
    assert nodes[1]["roles"] == ["rollout", "rollout", "sandbox"]  # one engine per GPU
    assert nodes[1]["services"]["rollout"].startswith("http://127.0.0.1:")
    assert nodes[0]["services"]["sandbox"] != nodes[1]["services"]["sandbox"]
    assert sorted(learning_metrics(out_dir)) == [1, 2, 3]
    assert (out_dir / "checkpoints" / "latest").read_text() == "step_000003"
    assert "node 1 (n2): " in result.stdout
    # Quiet, useful logs: no progress-bar redraws or megatron bucket listings; where the wandb run is.
    (run,) = (out_dir / "launch").glob("run_*")
    trainer_log = (run / "trainer_node0.log").read_text()
    assert "\r" not in trainer_log and "Params for bucket" not in trainer_log
    assert "offline; upload with `wandb sync " in trainer_log
    assert (run / "rollout_node1_0.log").exists() and (run / "rollout_node1_1.log").exists()
    tables = [row for row in history(out_dir) if "rollouts/samples" in row]
    assert [row["train/step"] for row in tables] == [1]  # the first step (logger.table_every=10)


def test_preempted_job_requeues_and_resumes_exactly(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    job = subprocess.Popen(rl_command(tmp_path, "nodes=2"), cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    job_id_file = tmp_path / "launch" / "slurm_job_id"
    try:
        output = preempt_after_first_step(job, tmp_path, job_id_file)
    finally:
        job.kill()
        if job_id_file.exists():
            subprocess.run(["scancel", job_id_file.read_text()])
    job_id = job_id_file.read_text()
    assert job.returncode == 0, output[-4000:]
    runs = sorted(p.name for p in (tmp_path / "launch").glob("run_*"))
    assert runs == [f"run_{job_id}_0", f"run_{job_id}_1"], "the job was not requeued once"
    first_log = (tmp_path / "launch" / runs[0] / "trainer_node0.log").read_text()
    assert "preempted: stopped after step" in first_log
    saved = int(first_log.split("preempted: stopped after step ")[1].split(" ")[0])
    assert saved < 3, "the signal arrived too late to test resumption"
    assert f"resuming from {tmp_path}/checkpoints/step_{saved:06d}" in (tmp_path / "launch" / runs[1] / "trainer_node0.log").read_text()
    resumed, expected = learning_metrics(tmp_path), learning_metrics(reference)
    assert sorted(resumed) == [1, 2, 3]
    for step in range(saved + 1, 4):
        assert resumed[step] == expected[step], f"step {step} differs after resumption"


def test_the_megatron_trainer_spans_two_nodes_with_rollouts_on_a_third(tmp_path):
    result = run_rl(tmp_path, "nodes=3", "cluster.trainer_nodes=2", "cluster.gpus_per_node=1", "grpo.steps=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    nodes = node_summaries(tmp_path)
    assert [nodes[n]["roles"][0] for n in range(3)] == ["trainer", "trainer", "rollout"]
    assert nodes[0]["trainer_exit_code"] == nodes[1]["trainer_exit_code"] == 0
    (run,) = (tmp_path / "launch").glob("run_*")
    follower = (run / "trainer_node1.log").read_text()
    assert "rollout step" not in follower and "step 1/2" not in follower  # rank 1 trains; the leader rolls out and logs
    assert sorted(learning_metrics(tmp_path)) == [1, 2]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000002"


def test_a_sweep_member_is_submitted_as_a_single_job_and_resumes_exactly_after_preemption(tmp_path):
    """Two members that differ only in a wandb tag, so the uninterrupted one is the reference for
    the other, preempted by Slurm's warning signal after its first step."""
    sweep = subprocess.Popen(
        [sys.executable, "jobs/rl.py", "-m", "cluster=slurm", "cluster.wait=true", *SMALL_RL, "nodes=2",
         "logger.tags=[first],[second]", f"hydra.sweep.dir={tmp_path}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    member = tmp_path / "0"
    job_ids = [tmp_path / str(n) / "launch" / "slurm_job_id" for n in (0, 1)]
    try:
        output = preempt_after_first_step(sweep, member, job_ids[0])
    finally:
        sweep.kill()
        for job_id in job_ids:
            if job_id.exists():
                subprocess.run(["scancel", job_id.read_text()])
    assert sweep.returncode == 0, output[-4000:]
    # Submitted as a single job is: one array of the node agent, every option of a single job.
    array_tasks = sorted(p.name for p in (tmp_path / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert [task.split("_")[1] for task in array_tasks] == ["0", "1"] and len({t.split("_")[0] for t in array_tasks}) == 1
    script = next((tmp_path / ".submitit").glob("*/*_submission.sh")).read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --mem=0", "--kill-on-bad-exit=1", "#SBATCH --signal=USR2@90"):
        assert line in script
    assert (member / "launch" / "job.sbatch").exists()  # checked with sbatch --test-only before submission
    # The preempted member saved, was requeued once and resumed exactly: the same learning as the other.
    runs = sorted((member / "launch").glob("run_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))
    assert len(runs) == 2, "member 0 was not requeued once"
    first_log = (runs[0] / "trainer_node0.log").read_text()
    assert "preempted: stopped after step" in first_log
    saved = int(first_log.split("preempted: stopped after step ")[1].split(" ")[0])
    assert saved < 3, "the signal arrived too late to test resumption"
    assert f"resuming from {member}/checkpoints/step_{saved:06d}" in (runs[1] / "trainer_node0.log").read_text()
    resumed, expected = learning_metrics(member), learning_metrics(tmp_path / "1")
    assert sorted(resumed) == [1, 2, 3]
    for step in resumed:
        differ = {k: (v, expected[step].get(k)) for k, v in resumed[step].items() if v != expected[step].get(k)}
        assert not differ, f"step {step} differs after resumption: {differ}"
    # One wandb group; every step in member 0's history, redone ones included; listed in order.
    for n in (0, 1):
        assert run_groups(tmp_path / str(n)) == {f"sweep-{tmp_path.name}"}
    assert {row["train/step"] for row in history(member) if "reward/mean" in row} == {1, 2, 3}
    listed = [line for line in output.splitlines() if re.match(r"sweep member \d+ .*: done", line)]
    assert [line.split()[2] for line in listed] == ["0", "1"]


def test_a_role_failing_its_health_check_fails_the_job_fast_and_says_why(tmp_path):
    crashes = "{name: broken, command: [python3, -c, 'import sys, time; time.sleep(1); sys.exit(\"no GPU 7\")']}"
    started = time.monotonic()
    result = run_rl(tmp_path, "nodes=2", f"cluster.extra_roles=[{crashes}]")  # ready_timeout_s stays 300
    assert result.returncode != 0
    assert time.monotonic() - started < 90, "the job hung instead of failing"
    assert "role broken failed its health check" in result.stderr
    assert "exited with code 1 before it was ready" in result.stderr and "no GPU 7" in result.stderr
    assert (tmp_path / "launch" / "slurm_job_id").read_text() not in queued_jobs()


def test_bad_configs_fail_before_anything_is_queued(tmp_path):
    before = queued_jobs()
    typo = run_rl(tmp_path / "typo", "grpo.stepz=3")
    assert typo.returncode != 0 and "stepz" in typo.stderr
    partition = run_rl(tmp_path / "partition", "cluster.partition=nosuchpartition")
    assert partition.returncode != 0 and "Slurm refuses this job" in partition.stderr
    assert not (tmp_path / "partition" / "launch" / "submitit").exists()
    assert not set(queued_jobs()) - set(before), "a job was queued"  # jobs of earlier tests may still be leaving


def test_the_rendered_sbatch_script_runs_the_same_job_when_submitted_by_hand(tmp_path):
    dry = run_rl(tmp_path, "grpo.steps=1", "cluster.dry_run=true")
    assert dry.returncode == 0, dry.stderr[-3000:]
    submitted = subprocess.run(["sbatch", "--parsable", str(tmp_path / "launch" / "job.sbatch")],
                               capture_output=True, text=True, check=True)
    job_id = submitted.stdout.strip()
    deadline = time.monotonic() + 240
    while job_id in queued_jobs():
        assert time.monotonic() < deadline, "the hand-submitted job did not finish"
        time.sleep(1)
    (summary,) = node_summaries(tmp_path).values()
    assert summary["job_id"] == int(job_id) and summary["trainer_exit_code"] == 0
    assert sorted(learning_metrics(tmp_path)) == [1]
