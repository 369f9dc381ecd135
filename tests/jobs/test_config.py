"""The jobs' config: composed and validated before anything runs (or waits in a queue)."""

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import MissingMandatoryValue, ValidationError

from deepeyes.config import RLJobConfig, register_configs, to_object
from tests.paths import CONF_DIR, REPO


def composed(job, *overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        # run.out_dir defaults to Hydra's run directory, which exists only inside a Hydra app.
        return compose(job, overrides=["run.out_dir=unused", *overrides])


def test_the_embedded_default_is_the_tiny_model_on_this_machine():
    cfg = to_object(composed("rl"))
    assert isinstance(cfg, RLJobConfig)
    assert (cfg.cluster.name, cfg.model.name, cfg.data.name, cfg.logger.mode) == ("local", "tiny", "sample", "offline")


@pytest.mark.parametrize("model", ["qwen2_5_vl_7b", "qwen2_5_vl_32b"])
def test_paper_models_bring_the_paper_settings(model):
    rl = composed("rl", f"model={model}", "model.path=/models/x")
    assert (rl.grpo.prompts_per_step, rl.rollout.n, rl.optim.lr) == (256, 16, 1e-6)
    assert (rl.rollout.max_response_tokens, rl.rollout.max_turns) == (16384, 9)
    sft = composed("sft", f"model={model}", "model.path=/models/x")
    assert (sft.optim.lr, sft.sft.epochs, sft.sft.cutoff_len) == (1e-5, 3, 20480)
    assert (sft.model.max_pixels, sft.model.freeze_vision) == (262144, True)
    # The command line still wins over the preset.
    assert composed("rl", f"model={model}", "rollout.n=8").rollout.n == 8


@pytest.mark.parametrize("n", [1, 0])
def test_a_grpo_group_of_one_is_refused_with_the_key_named(n):
    """A group of one has advantage 0 (its reward minus its own mean): the run would learn nothing."""
    with pytest.raises(ValueError, match=f"rollout.n={n}"):
        to_object(composed("rl", f"rollout.n={n}"))
    assert to_object(composed("eval", "rollout.n=1")).rollout.n == 1  # only RL needs a group


def test_the_protocol_variant_is_checked_and_the_learning_presets_pin_feedback():
    assert to_object(composed("rl")).protocol.variant == "deepeyesv2"
    with pytest.raises(ValueError, match="protocol.variant='released'"):
        to_object(composed("rl", "protocol.variant=released"))
    for job, preset in (("rl", "learning_rl"), ("eval", "learning_eval")):
        assert to_object(composed(job, f"+experiment={preset}")).protocol.variant == "feedback"
    assert to_object(composed("synthesize")).protocol.variant == "feedback"
    with pytest.raises(ValueError, match="synthesis needs 'feedback'"):
        to_object(composed("synthesize", "protocol.variant=deepeyesv2"))


def test_a_paper_model_without_a_checkpoint_path_is_refused():
    with pytest.raises(MissingMandatoryValue, match="model.path"):
        to_object(composed("rl", "model=qwen2_5_vl_7b"))


@pytest.mark.parametrize(
    "override, message",
    [("rollout.nn=3", "nn"), ("rollout.n=three", "three"), ("model=tiny7", "tiny7")],
)
def test_typos_fail_at_composition(override, message):
    with pytest.raises((ConfigCompositionException, ValidationError), match=message):
        to_object(composed("rl", override))


@pytest.mark.parametrize(
    "override, message",
    [("rollout.temperature=0", "temperature"), ("grpo.prompts_per_step=0", "prompts_per_step"),
     ("tools.code.isolation=docker", "isolation")],
)
def test_values_out_of_range_are_refused_with_the_key_named(override, message):
    with pytest.raises(ValueError, match=message):
        to_object(composed("rl", override))


@pytest.mark.slow
def test_cfg_job_prints_the_resolved_config_without_running():
    out = subprocess.run(
        [sys.executable, "jobs/rl.py", "--cfg", "job", "rollout.n=5"], cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "'n': 5" in out.stdout and "max_turns" in out.stdout
