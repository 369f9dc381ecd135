"""Cold-start SFT on the tiny model: it learns the trajectories, and bad samples are accounted for."""

import json

import pytest
from hydra import compose, initialize_config_dir

from deepeyes.config import register_configs, to_object
from deepeyes.data import read_sft_records, write_sft_records
from deepeyes.model import load_model
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
