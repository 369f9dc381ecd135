"""Cold-start SFT on the tiny model: it learns the trajectories, and bad samples are accounted for."""

import json
import math
import os
import threading
import time

import pytest
import torch
from safetensors.torch import load_file
from hydra import compose, initialize_config_dir

from deepeyes.config import OptimConfig, register_configs, to_object
from deepeyes.data import read_sft_records, write_sft_records
from deepeyes.train.preemption import STOP_SIGNAL, Preempted
from deepeyes.model import load_model
from deepeyes.train.setup import set_learning_rate, warmup_steps
from deepeyes.train.sft import train_sft
from tests.paths import CONF_DIR

pytestmark = pytest.mark.slow


def sft_config(out_dir, *overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return to_object(compose("sft", overrides=[f"run.out_dir={out_dir}", *overrides]))


def test_sft_fits_its_trajectories_and_saves_a_loadable_checkpoint(tmp_path, sample_data):
    records = read_sft_records(sample_data.sft_train)[:3]
    write_sft_records(tmp_path / "sft.jsonl", records)
    cfg = sft_config(
        tmp_path / "run", f"data.sft={tmp_path / 'sft.jsonl'}", "sft.epochs=12", "sft.batch_size=3",
        "sft.micro_batch_size=2", "optim.lr=3e-3",
    )
    checkpoint = train_sft(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["sft/loss"] for row in rows if "sft/loss" in row]
    assert len(losses) == 12
    assert losses[-1] < losses[0] - 2.0  # nats per token, from ~12 (uniform over 152k) down
    assert rows[0]["data/samples"] == 3
    assert load_model(checkpoint).num_parameters() > 0


def test_samples_over_the_cutoff_are_dropped_and_counted(tmp_path, sample_data):
    records = read_sft_records(sample_data.sft_train)[:2]
    write_sft_records(tmp_path / "sft.jsonl", records)
    cfg = sft_config(tmp_path / "run", f"data.sft={tmp_path / 'sft.jsonl'}", "sft.cutoff_len=10")
    with pytest.raises(ValueError, match="no usable sample .*too_long.: 2"):
        train_sft(cfg)


def stop_once_step_1_is_logged(out_dir):
    """What Slurm does before a time limit: SIGUSR2 to the trainer, here once step 1 is logged."""
    def watch():
        metrics = out_dir / "metrics.jsonl"
        while '"step": 1,' not in (metrics.read_text() if metrics.exists() else ""):
            time.sleep(0.05)
        os.kill(os.getpid(), STOP_SIGNAL)

    threading.Thread(target=watch, daemon=True).start()


def test_a_preempted_sft_run_saves_and_resumes_exactly(tmp_path, sample_data):
    records = read_sft_records(sample_data.sft_train)[:4]
    write_sft_records(tmp_path / "sft.jsonl", records)
    # the reference trainer (tests/megatron/test_sft_job.py stops and resumes the megatron one)
    small = [f"data.sft={tmp_path / 'sft.jsonl'}", "sft.epochs=2", "sft.batch_size=2", "optim.lr=3e-3", "trainer=hf"]
    whole = train_sft(sft_config(tmp_path / "whole", *small))
    stop_once_step_1_is_logged(tmp_path / "stopped")
    with pytest.raises(Preempted, match=r"stopped after step [123] on the stop signal"):
        train_sft(sft_config(tmp_path / "stopped", *small))
    resumed = train_sft(sft_config(tmp_path / "stopped", *small))  # the requeued job
    assert whole.name == resumed.name == "step_000004"
    want, got = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(want[name].equal(got[name]) for name in want)
    losses = lambda run: {r["step"]: r["sft/loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines()) if "sft/loss" in r}  # noqa: E731
    assert losses("stopped") == losses("whole")


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_warms_up_then_follows_its_schedule(schedule):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    cfg = OptimConfig(lr=1.0, warmup_steps=2, schedule=schedule)
    rates = [set_learning_rate(optimizer, cfg, step, total_steps=6) for step in range(6)]
    assert rates[:3] == [0.5, 1.0, 1.0] and optimizer.param_groups[0]["lr"] == rates[-1]
    if schedule == "constant":
        assert rates[3:] == [1.0, 1.0, 1.0]
    else:  # from 1 after warmup down towards 0 at the last step
        assert rates[2:] == pytest.approx([1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 - 0.5 * math.cos(math.pi / 4)])


def test_warmup_ratio_warms_up_over_that_share_of_the_run_then_decays():
    """The release's SFT: cosine with warmup_ratio 0.1 (transformers: ceil(0.1 x steps) warmup steps)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    cfg = OptimConfig(lr=1.0, warmup_ratio=0.1, schedule="cosine")
    rates = [set_learning_rate(optimizer, cfg, step, total_steps=30) for step in range(30)]
    assert warmup_steps(cfg, 30) == 3  # not 4: 0.1 x 30 is 3.0000000000000004 in floating point
    assert rates[:4] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])  # the peak right after the warmup
    assert all(a > b for a, b in zip(rates[3:], rates[4:])) and rates[-1] < 0.01
    assert warmup_steps(cfg, 25) == 3 and warmup_steps(cfg, 2343) == 235  # rounded up: 3 epochs of 100k at 128
    assert warmup_steps(OptimConfig(warmup_steps=5), 30) == 5 and warmup_steps(OptimConfig(), 30) == 0
