"""The RL job with its services as separate local processes: the same run as in process, and
no process left behind however it ends."""

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
from safetensors.torch import load_file

from deepeyes.train.rl import train_grpo
from tests.paths import REPO
from tests.train.test_grpo import SMALL, rl_config

pytestmark = pytest.mark.slow

SERVICE_MODULES = ("deepeyes.rollout.server", "deepeyes.tools.search_service")


def service_processes(parent):
    return [p for p in parent.children(recursive=True) if any(m in " ".join(p.cmdline()) for m in SERVICE_MODULES)]


def rollouts(run_dir, step):
    lines = (run_dir / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()
    return [(r["model_turns"], r["reward"]) for r in map(json.loads, lines)]


def test_an_rl_run_through_services_is_the_in_process_run_with_either_weight_sync(tmp_path):
    in_process = train_grpo(rl_config(tmp_path / "a", "grpo.steps=2"))
    served = train_grpo(rl_config(tmp_path / "b", "grpo.steps=2", "rollout.servers=2"))
    for step in (1, 2):
        assert rollouts(tmp_path / "a", step) == rollouts(tmp_path / "b", step)
    a, b = load_file(in_process / "model.safetensors"), load_file(served / "model.safetensors")
    assert all(a[name].equal(b[name]) for name in a)
    metrics = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["rollout/staleness"] for m in metrics] == [0.0, 0.0]
    assert [m["rollout/server_failures"] for m in metrics] == [0.0, 0.0]
    assert all(m["policy/rollout_logprob_abs_diff"] < 1e-4 for m in metrics)  # the servers had the trained weights
    assert sorted(p.name for p in (tmp_path / "b" / "weights").iterdir()) == [
        "weights_v000001.safetensors", "weights_v000002.safetensors"]
    assert service_processes(psutil.Process()) == []

    broadcast = train_grpo(rl_config(tmp_path / "c", "grpo.steps=2", "rollout.servers=2", "rollout.weight_sync=broadcast"))
    for step in (1, 2):  # the servers sampled from exactly the trainer's weights, step after step
        assert rollouts(tmp_path / "a", step) == rollouts(tmp_path / "c", step)
    c = load_file(broadcast / "model.safetensors")
    assert all(a[name].equal(c[name]) for name in a)
    metrics = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [m["rollout/weight_sync_failures"] for m in metrics] == [0.0, 0.0]
    assert all(m["policy/rollout_logprob_abs_diff"] < 1e-4 for m in metrics)
    assert not (tmp_path / "c" / "weights").exists()  # nothing went through the filesystem
    assert service_processes(psutil.Process()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_the_job_stops_its_services(tmp_path, sig):
    overrides = [o for o in SMALL if not o.startswith("rollout.servers")]
    job = subprocess.Popen(
        [sys.executable, "jobs/rl.py", *overrides, "grpo.steps=1000", "logger.mode=disabled",
         f"hydra.run.dir={tmp_path}"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        # SIGINT as Ctrl-C delivers it: a shell that started pytest in the background (`&`
        # without job control) makes its children ignore SIGINT, and the job would inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "rollouts").exists():  # services up, training under way
            assert job.poll() is None and time.monotonic() < deadline, "the job ended or never started training"
            time.sleep(0.2)
        services = service_processes(psutil.Process(job.pid))
        assert len(services) == 2
        job.send_signal(sig)
        job.wait(60)
        gone, alive = psutil.wait_procs(services, timeout=30)
        assert alive == []
    finally:
        if job.poll() is None:
            job.kill()


def test_services_get_no_secret_of_the_trainer_and_search_only_the_key_it_uses(tmp_path, monkeypatch):
    """Canaries planted in the trainer's environment reach none of the service processes; the
    search service gets SERPAPI_API_KEY exactly when a search backend is serpapi."""
    from deepeyes.rollout.services import rl_services
    from deepeyes.train.setup import data_paths, ensure_tiny_model

    canaries = {"WANDB_API_KEY": "canary-wandb", "OPENAI_API_KEY": "canary-openai", "SERPAPI_API_KEY": "canary-serp"}
    for name, value in canaries.items():
        monkeypatch.setenv(name, value)

    def service_environments(name, *overrides):
        cfg = rl_config(tmp_path / name, "rollout.servers=1", *overrides)
        paths = data_paths(cfg.data, cfg.tools)
        with rl_services(cfg, tmp_path / "run", ensure_tiny_model(), 0, paths.corpus, paths.image_index, paths.train):
            processes = service_processes(psutil.Process())
            return {next(m for m in SERVICE_MODULES if m in " ".join(p.cmdline())): p.environ() for p in processes}

    local = service_environments("local")
    assert set(local) == set(SERVICE_MODULES)
    assert all(name not in env for env in local.values() for name in canaries)
    assert local["deepeyes.tools.search_service"]["PATH"]  # what a process needs is still there

    web = service_environments("web", "tools.image_search_backend=serpapi")
    assert web["deepeyes.tools.search_service"]["SERPAPI_API_KEY"] == "canary-serp"
    assert all(name not in web["deepeyes.tools.search_service"] for name in ("WANDB_API_KEY", "OPENAI_API_KEY"))
    assert all(name not in web["deepeyes.rollout.server"] for name in canaries)
