"""The jobs' config: composed and validated before anything runs (or waits in a queue)."""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import MissingMandatoryValue, ValidationError

from deepeyes.agent.protocol import STOP_STRINGS
from deepeyes.config import SERPAPI_KEY_VARIABLE, RLJobConfig, register_configs, to_object
from deepeyes.data import ensure_sample_data
from deepeyes.launch.plan import build_plan
from deepeyes.model import ensure_tiny_model
from deepeyes.rollout.services import search_service_command
from deepeyes.tools.search_service import SearchError, SerpAPISearch
from deepeyes.train.setup import data_paths
from tests.paths import CONF_DIR, REPO


def composed(job, *overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        # run.out_dir defaults to Hydra's run directory, which exists only inside a Hydra app.
        return compose(job, overrides=["run.out_dir=unused", *overrides])


@pytest.fixture(autouse=True)
def serpapi_key(monkeypatch):
    """The RL presets search the web: their validation needs the key in the environment."""
    monkeypatch.setenv(SERPAPI_KEY_VARIABLE, "test-key")


def test_the_embedded_default_is_the_tiny_model_on_this_machine():
    cfg = to_object(composed("rl"))
    assert isinstance(cfg, RLJobConfig)
    assert (cfg.cluster.name, cfg.model.name, cfg.logger.mode) == ("local", "tiny", "offline")


@pytest.mark.slow
def test_the_main_job_is_rl_from_the_cold_start_on_the_learning_recipe_and_planning_it_builds_nothing(tmp_path):
    """`make run` (`python jobs/rl.py`) shows learning: GRPO from the tiny model's cold start, with
    the learning recipe's data and RL settings, the learning proof's RL preset. Printing or
    planning the job does not build the cold start (minutes of SFT)."""
    cfg = to_object(composed("rl"))
    assert cfg.model.cold_start and cfg.model.path is None and cfg.run.init_from is None
    assert (cfg.data.name, cfg.data.sample_recipe, cfg.trainer.backend) == ("learning", "learning", "hf")
    assert (cfg.protocol.variant, cfg.rollout.temperature, cfg.rollout.servers, cfg.optim.lr) == ("feedback", 0.7, 0, 1.5e-4)
    assert to_object(composed("rl", "+experiment=learning_rl")) == cfg

    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / ensure_tiny_model().name).symlink_to(ensure_tiny_model())
    (cache / "data").symlink_to(data_paths(cfg.data).train.parent.parent)

    def printed(*overrides):
        out = subprocess.run([sys.executable, "jobs/rl.py", *overrides, f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO,
                             capture_output=True, text=True, timeout=120, env={**os.environ, "DEEPEYES_CACHE": str(cache)})
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    assert "cold_start: true" in printed("--cfg", "job")
    assert "launch plan: rl on 1 node(s)" in printed("cluster.dry_run=true")
    assert "launch plan: rl on 2 node(s)" in printed("cluster=slurm", "nodes=2", "cluster.dry_run=true")
    assert [p.name for p in (cache / "models").iterdir()] == [ensure_tiny_model().name]


PAPER_REQUIRED = {
    "rl": {"model.path": "/models/sft", "data.train": "/data/rl_train.jsonl", "data.image_index": "/data/image_index.jsonl",
           "reward.judge.model": "/models/Qwen2.5-72B-Instruct", "grpo.steps": "100"},
    "sft": {"model.path": "/models/Qwen2.5-VL", "data.sft": "/data/sft.jsonl"},
}
PAPER_PRESETS = [("rl", "7b"), ("rl", "32b"), ("sft", "7b"), ("sft", "32b")]


def paper(job, size, *overrides, leave_out=()):
    given = [f"{key}={value}" for key, value in PAPER_REQUIRED[job].items() if key not in leave_out]
    return composed(job, f"+experiment=deepeyesv2_{size}_{job}", *given, *overrides)


@pytest.mark.parametrize("job, size", PAPER_PRESETS)
def test_paper_presets_resolve_to_the_release_settings_on_8_gpu_nodes(job, size, tmp_path):
    cfg = to_object(paper(job, size))
    assert cfg.model.name == f"qwen2_5_vl_{size}" and (cfg.model.max_pixels, cfg.model.freeze_vision) == (262144, True)
    assert (cfg.cluster.name, cfg.cluster.nodes, cfg.cluster.gpus_per_node) == ("slurm", 8, 8)
    assert cfg.cluster.time_min >= 24 * 60 and cfg.cluster.max_requeues >= 10 and cfg.run.save_every > 0
    assert cfg.run.keep_checkpoints == 3  # ~520 GB each for 32B with the optimizer
    assert cfg.trainer.backend == "megatron" and cfg.trainer.distributed_optimizer and cfg.trainer.recompute
    assert cfg.trainer.tensor_parallel == {"7b": 4, "32b": 8}[size] and cfg.data.allow_sample is False
    assert cfg.logger.mode == "online"
    if job == "rl":
        assert (cfg.grpo.prompts_per_step, cfg.rollout.n, cfg.grpo.mini_batch_size, cfg.optim.lr) == (256, 16, 32 * 16, 1e-6)
        assert (cfg.rollout.max_turns, cfg.rollout.max_turn_tokens, cfg.rollout.max_response_tokens) == (9, 8192, 16384)
        assert (cfg.grpo.clip_ratio_low, cfg.grpo.clip_ratio_high) == (0.2, 0.2)  # verl's clip; no KL term exists
        assert cfg.rollout.backend == "vllm" and cfg.rollout.tensor_parallel == {"7b": 1, "32b": 4}[size]
        assert cfg.reward.judge.enabled and cfg.reward.judge.model == "/models/Qwen2.5-72B-Instruct"
        assert STOP_STRINGS == ("</code>", "</tool_call>")  # the release's custom_stop
    else:
        assert (cfg.optim.lr, cfg.optim.schedule, cfg.sft.epochs, cfg.sft.max_steps) == (1e-5, "cosine", 3, 0)
        assert (cfg.optim.warmup_ratio, cfg.optim.warmup_steps) == (0.1, 0)  # the release's warmup_ratio
        assert cfg.sft.cutoff_len == {"7b": 20480, "32b": 16384}[size]  # the release's 7B and 32B configs
    # The launch plan takes it: TP x PP divides the trainer ranks, roles fit the nodes.
    plan = build_plan(job, cfg, tmp_path)
    trainers = [role for role in plan.roles if role.name == "trainer"]
    assert trainers[0].world_size % (cfg.trainer.tensor_parallel * cfg.trainer.pipeline_parallel) == 0
    # The plan's GPU memory estimate fits every trainer and rollout GPU, and the dry run prints it
    # (the judge's too where its checkpoint's config.json is readable; not at this made-up path).
    assert all("GiB" in role.gpu_memory for role in plan.roles if role.gpus and role.name != "judge")
    assert "GiB" in plan.describe()
    # The command line still wins over the preset.
    assert to_object(paper(job, size, "trainer.tensor_parallel=2")).trainer.tensor_parallel == 2


@pytest.mark.parametrize("job, size", PAPER_PRESETS)
def test_a_paper_preset_without_tensor_parallel_and_the_distributed_optimizer_is_refused_before_queueing(
        job, size, tmp_path):
    cfg = to_object(paper(job, size, "trainer.tensor_parallel=1", "trainer.sequence_parallel=false",
                          "trainer.distributed_optimizer=false"))
    with pytest.raises(ValueError, match="the trainer does not fit its GPUs") as refused:
        build_plan(job, cfg, tmp_path)
    for named in ("trainer.tensor_parallel=1", "trainer.distributed_optimizer=False", "cluster.gpu_memory_gb=80"):
        assert named in str(refused.value)


@pytest.mark.parametrize("job, size", PAPER_PRESETS)
def test_a_paper_preset_names_every_required_key_left_unset(job, size):
    with pytest.raises(MissingMandatoryValue, match="config needs " + ", ".join(PAPER_REQUIRED[job])):
        to_object(composed(job, f"+experiment=deepeyesv2_{size}_{job}"))
    for key in PAPER_REQUIRED[job]:
        with pytest.raises(MissingMandatoryValue, match=rf"config needs {key} \(the preset requires"):
            to_object(paper(job, size, leave_out=(key,)))


def test_a_paper_preset_refuses_the_bundled_toy_data_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPEYES_CACHE", str(tmp_path))
    toy = ensure_sample_data(n_per_family=2)
    with pytest.raises(ValueError, match=r"data.sft=.*is the bundled toy data.*data.allow_sample=true"):
        to_object(paper("sft", "7b", f"data.sft={toy.sft_train}"))
    with pytest.raises(ValueError, match=r"data.train=.*is the bundled toy data"):
        to_object(paper("rl", "7b", f"data.train={toy.rl_train}"))
    with pytest.raises(ValueError, match=r"data.corpus is not set.*refuses the bundled toy data"):
        to_object(paper("rl", "7b", "tools.search_backend=local"))  # local search would read the toy corpus
    with pytest.raises(ValueError, match=r"data.sft_mix\[1\]=.*is the bundled toy data"):
        to_object(paper("sft", "7b", "data.sft=null",
                        f"data.sft_mix=[{{name: a, path: /data/a.jsonl}}, {{name: b, path: {toy.sft_train}}}]"))
    allowed = to_object(paper("sft", "7b", f"data.sft={toy.sft_train}", "data.allow_sample=true"))
    assert allowed.data.sft == str(toy.sft_train)


def test_serpapi_search_without_its_key_in_the_jobs_environment_is_refused_before_queueing(monkeypatch, tmp_path):
    monkeypatch.delenv(SERPAPI_KEY_VARIABLE)
    with pytest.raises(ValueError, match=r"tools.search_backend=serpapi needs the SerpAPI key in the environment "
                                         r"variable SERPAPI_API_KEY, which is not set here"):
        to_object(paper("rl", "7b"))
    with pytest.raises(ValueError, match=r"config tools.image_search_backend=serpapi needs .* SERPAPI_API_KEY"):
        to_object(composed("rl", "tools.image_search_backend=serpapi"))
    assert to_object(composed("rl")).tools.search_backend == "local"  # local search needs no key
    assert to_object(paper("rl", "7b", "tools.search_backend=local", "data.corpus=/data/corpus.jsonl"))
    # The name is the one the search service reads.
    with pytest.raises(SearchError, match=SERPAPI_KEY_VARIABLE):
        SerpAPISearch(tmp_path)

    monkeypatch.setenv(SERPAPI_KEY_VARIABLE, "test-key")
    with pytest.raises(ValueError, match=r"needs SERPAPI_API_KEY in the job's environment, but "
                                         r"cluster.sbatch_extra.export='NONE' does not pass it on"):
        to_object(paper("rl", "7b", "+cluster.sbatch_extra.export=NONE"))
    for export in ("ALL", "'ALL,HOME'", "'PATH,SERPAPI_API_KEY'"):
        assert to_object(paper("rl", "7b", f"+cluster.sbatch_extra.export={export}"))


def test_search_indexes_the_backends_do_not_read_are_neither_built_nor_passed(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPEYES_CACHE", str(tmp_path / "cache"))
    cfg = to_object(paper("rl", "7b", "tools.image_search_backend=mmsearch_cache"))
    paths = data_paths(cfg.data, cfg.tools)  # web text search, the MMSearch cache for images
    assert (paths.train, paths.corpus, paths.image_index) == (Path("/data/rl_train.jsonl"), None, None)
    command = search_service_command(cfg, paths.corpus, paths.image_index, paths.train, tmp_path, 1, tmp_path / "token")
    assert "--corpus" not in command and "--image-index" not in command
    assert not (tmp_path / "cache").exists()  # the toy data was never generated
    # A local backend reads its index: the configured one, else the bundled sample's, built on first read.
    local = data_paths(cfg.data, replace(cfg.tools, search_backend="local"))
    assert local.corpus.name == "corpus.jsonl" and (tmp_path / "cache" / "data").is_dir()


def test_a_paper_model_alone_is_the_model_only_and_says_where_the_recipe_is(caplog):
    cfg = to_object(composed("rl", "model=qwen2_5_vl_7b", "model.path=/models/x"))
    assert (cfg.grpo.steps, cfg.rollout.backend, cfg.data.name) == (8, "hf", "learning")
    assert "+experiment=deepeyesv2_<size>_sft / deepeyesv2_<size>_rl" in caplog.text


@pytest.mark.parametrize(
    "overrides, message",
    [(["trainer=hf", "trainer.distributed_optimizer=true"], "trainer.distributed_optimizer=True needs trainer=megatron"),
     (["trainer=hf", "trainer.tensor_parallel=2"], "trainer.tensor_parallel=2 needs trainer=megatron"),
     (["trainer=megatron", "trainer.sequence_parallel=true"],
      "sequence_parallel=true needs trainer.tensor_parallel > 1"),
     (["trainer=megatron", "trainer.pipeline_parallel=0"], "trainer.pipeline_parallel=0: must be >= 1")],
)
def test_trainer_settings_that_would_do_nothing_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        to_object(composed("rl", *overrides))


@pytest.mark.parametrize("n", [1, 0])
def test_a_grpo_group_of_one_is_refused_with_the_key_named(n):
    """A group of one has advantage 0 (its reward minus its own mean): the run would learn nothing."""
    with pytest.raises(ValueError, match=f"rollout.n={n}"):
        to_object(composed("rl", f"rollout.n={n}"))
    assert to_object(composed("eval", "rollout.n=1")).rollout.n == 1  # only RL needs a group


def test_the_protocol_variant_is_checked_and_the_learning_presets_pin_feedback():
    assert to_object(composed("rl")).protocol.variant == "feedback"  # the embedded default is the learning recipe's
    assert to_object(paper("rl", "7b")).protocol.variant == "deepeyesv2"  # the paper's: the released rules
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
     ("tools.code.isolation=docker", "isolation"),
     ("optim.warmup_ratio=1.5", r"optim.warmup_ratio=1.5: must be in \[0, 1\)"),
     ("optim.warmup_steps=-1", "optim.warmup_steps=-1: must be >= 0"),
     ("run.keep_checkpoints=-1", r"run.keep_checkpoints=-1: must be >= 0 \(0 = keep all\)")],
)
def test_values_out_of_range_are_refused_with_the_key_named(override, message):
    with pytest.raises(ValueError, match=message):
        to_object(composed("rl", override))


def test_warmup_steps_and_warmup_ratio_together_are_refused():
    with pytest.raises(ValueError, match=r"optim.warmup_steps=10 and optim.warmup_ratio=0.1 are both set"):
        to_object(composed("sft", "optim.warmup_steps=10", "optim.warmup_ratio=0.1"))
    with pytest.raises(ValueError, match=r"optim.warmup_steps=10 and optim.warmup_ratio=0.1 are both set"):
        to_object(paper("sft", "7b", "optim.warmup_steps=10"))  # the preset's ratio: clear it to count steps
    assert to_object(paper("sft", "7b", "optim.warmup_steps=10", "optim.warmup_ratio=0")).optim.warmup_steps == 10


@pytest.mark.slow
def test_cfg_job_prints_the_resolved_config_without_running():
    out = subprocess.run(
        [sys.executable, "jobs/rl.py", "--cfg", "job", "rollout.n=5"], cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "'n': 5" in out.stdout and "max_turns" in out.stdout
