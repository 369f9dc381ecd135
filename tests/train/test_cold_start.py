"""The tiny model's cold start: the learning recipe's SFT, built once into the cache by the real SFT job."""

import pytest

from deepeyes.config import ModelConfig
from deepeyes.train.cold_start import ensure_cold_start_checkpoint
from deepeyes.train.setup import load_policy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SHORT = ("sft.max_steps=2", "data.sample_per_family=4")  # the recipe, shortened: the test checks the plumbing


def test_built_once_as_a_plain_model_directory_and_loaded_by_the_trainer(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPEYES_CACHE", str(tmp_path / "cache"))
    checkpoint = ensure_cold_start_checkpoint(overrides=SHORT)
    assert checkpoint.parent == tmp_path / "cache" / "models" and checkpoint.name.startswith("qwen2_5_vl-tiny-cold-start-")
    assert (checkpoint / "config.json").is_file() and (checkpoint / "model.safetensors").is_file()
    assert not (checkpoint / "trainer_state.pt").exists()
    leftovers = [p.name for p in checkpoint.parent.iterdir() if p.name.startswith(("cold-start-sft-", ".qwen"))]
    assert leftovers == [f".{checkpoint.name}.lock"]  # no run directory or half-built copy behind
    built_at = (checkpoint / "model.safetensors").stat().st_mtime_ns
    assert ensure_cold_start_checkpoint(overrides=SHORT) == checkpoint  # cached: not built again
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == built_at
    # The trainer starts from it when the tiny model is asked for with its cold start.
    monkeypatch.setattr("deepeyes.train.setup.ensure_cold_start_checkpoint", lambda: checkpoint)
    policy = load_policy(ModelConfig(cold_start=True))
    assert policy.path == checkpoint
