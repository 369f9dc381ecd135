"""Data mixtures: weighted sampling over several sources, its config, and the realized mix the
SFT and RL jobs log per step."""

import json
import math
from collections import Counter

import pytest
from hydra import compose, initialize_config_dir

from deepeyes.config import DataConfig, SourceConfig, register_configs, to_object
from deepeyes.data import read_records, read_sft_records, write_records, write_sft_records
from deepeyes.train.sampler import EpochSampler, MixtureSampler, realized_mix
from deepeyes.train.setup import task_sampler
from tests.paths import CONF_DIR, TOY_RL

WEIGHTS = {"perception": 5.0, "reasoning": 3.0, "long_cot": 2.0}


def mixture(seed=0):
    sources = {"perception": list(range(40)), "reasoning": list(range(100, 107)), "long_cot": list(range(200, 300))}
    return MixtureSampler(sources, WEIGHTS, seed)


def within_sampling_error(counts: Counter, draws: int) -> None:
    """Each source's share is within 4 standard deviations of its weight's share (binomial)."""
    total = sum(WEIGHTS.values())
    for name, weight in WEIGHTS.items():
        p = weight / total
        assert abs(counts[name] / draws - p) <= 4 * math.sqrt(p * (1 - p) / draws), (name, counts, draws)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_weighted_mixture_realizes_its_weights_within_sampling_error(seed):
    sampler = mixture(seed)
    counts, per_step = Counter(), []
    for _ in range(500):  # 500 steps of 16 samples
        items = sampler.take(16)
        assert len(items) == 16 and len(sampler.last_sources) == 16
        counts.update(sampler.last_sources)
        per_step.append(realized_mix(sampler.last_sources))
    within_sampling_error(counts, 8000)
    assert all(math.isclose(sum(mix.values()), 1.0) for mix in per_step)
    # Steps differ: the mix is sampled, not dealt out in fixed proportions.
    assert len({tuple(sorted(mix.items())) for mix in per_step}) > 50


def test_each_source_goes_through_all_its_items_before_repeating_any():
    sampler = mixture()
    by_source = {name: [] for name in WEIGHTS}
    for item, name in zip(sampler.take(3000), [*sampler.last_sources]):
        by_source[name].append(item)
    reasoning = by_source["reasoning"]  # 7 items: many epochs
    for start in range(0, len(reasoning) - 7, 7):
        assert sorted(reasoning[start : start + 7]) == list(range(100, 107))


def test_one_source_is_its_epoch_sampler_and_a_mixture_resumes_exactly():
    items = list(range(13))
    assert MixtureSampler({"train": items}, {"train": 1.0}, 5).take(40) == EpochSampler(items, 5).take(40)

    uninterrupted = mixture()
    expected = uninterrupted.take(37) + uninterrupted.take(50)
    first = mixture()
    head = first.take(37)
    resumed = mixture()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as a checkpoint stores it
    assert head + resumed.take(50) == expected


def test_bad_mixtures_are_refused():
    with pytest.raises(ValueError, match="weights"):
        MixtureSampler({"a": [1]}, {"a": 0.0}, 0)
    with pytest.raises(ValueError, match="no items"):
        MixtureSampler({"a": [1], "b": []}, {"a": 1.0, "b": 1.0}, 0)


def composed(job, *overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(job, overrides=["run.out_dir=.", *overrides])


def test_mixture_configs_compose_from_the_command_line_and_bad_ones_fail_before_running():
    cfg = to_object(composed("sft", "data.sft_mix=[{name: a, path: a.jsonl, weight: 3}, {name: b, path: b.jsonl}]"))
    assert cfg.data.sft_mix == [SourceConfig("a", "a.jsonl", 3.0), SourceConfig("b", "b.jsonl", 1.0)]
    for bad, message in [
        ("data.train_mix=[{name: a, path: a.jsonl, weight: 0}]", "weight must be > 0"),
        ("data.train_mix=[{name: a, path: a.jsonl}, {name: a, path: b.jsonl}]", "more than once"),
        ("data.train_mix=[{name: a}]", "needs a name and a path"),
    ]:
        with pytest.raises(ValueError, match=message):
            to_object(composed("rl", bad))
    with pytest.raises(ValueError, match="both set"):
        to_object(composed("sft", "data.sft=x.jsonl", "data.sft_mix=[{name: a, path: a.jsonl}]"))


def split_by_family(records, out_dir, writer):
    paths = {}
    for family in sorted({r.family for r in records}):
        paths[family] = out_dir / f"{family}.jsonl"
        writer(paths[family], [r for r in records if r.family == family])
    return paths


def test_rl_tasks_are_drawn_from_the_sources_by_weight(sample_data, tmp_path):
    paths = split_by_family(read_records(sample_data.rl_train), tmp_path, write_records)
    weights = {"perception": 5.0, "arithmetic": 3.0, "lookup": 2.0}
    cfg = DataConfig(train_mix=[SourceConfig(name, str(paths[name]), w) for name, w in weights.items()])
    sampler = task_sampler(cfg, seed=0)
    records = sampler.take(4000)
    assert all(r.family == source for r, source in zip(records, sampler.last_sources))
    counts = Counter(r.family for r in records)
    for name, weight in weights.items():
        p = weight / 10
        assert abs(counts[name] / 4000 - p) <= 4 * math.sqrt(p * (1 - p) / 4000)


@pytest.mark.slow
def test_sft_and_rl_jobs_log_the_realized_mix_of_every_step(sample_data, tmp_path):
    from deepeyes.train.rl import train_grpo
    from deepeyes.train.sft import train_sft

    sft_paths = split_by_family(read_sft_records(sample_data.sft_train), tmp_path, write_sft_records)
    mix = "[" + ", ".join(f"{{name: {n}, path: '{p}', weight: {w}}}" for (n, p), w in
                          zip(sorted(sft_paths.items()), (1, 2, 1))) + "]"
    sft = to_object(composed("sft", f"data.sft_mix={mix}", "sft.batch_size=4", "sft.max_steps=3", "trainer=hf",
                             "logger.mode=disabled", f"run.out_dir={tmp_path / 'sft'}"))
    train_sft(sft)
    steps = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()][1:]
    assert len(steps) == 3
    for row in steps:
        shares = {k.removeprefix("data/mix/"): v for k, v in row.items() if k.startswith("data/mix/")}
        assert set(shares) <= set(sft_paths) and math.isclose(sum(shares.values()), 1.0)
        assert all(math.isclose(v * 4, round(v * 4)) for v in shares.values())  # shares of a 4-sample batch

    rl_paths = split_by_family(read_records(sample_data.rl_train), tmp_path, write_records)
    mix = "[" + ", ".join(f"{{name: {n}, path: '{p}'}}" for n, p in sorted(rl_paths.items())) + "]"
    rl = to_object(composed(
        "rl", *TOY_RL, f"data.train_mix={mix}", "trainer=hf", "grpo.steps=2", "grpo.prompts_per_step=3", "rollout.n=2",
        "rollout.max_turn_tokens=8", "rollout.max_response_tokens=32", "rollout.max_turns=1", "rollout.servers=0",
        "logger.mode=disabled", f"run.out_dir={tmp_path / 'rl'}"))
    train_grpo(rl)
    rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for step, row in enumerate(rows, 1):
        dumped = [json.loads(line) for line in (tmp_path / "rl" / "rollouts" / f"step_{step:06d}.jsonl").open()]
        families = Counter(d["family"] for d in dumped)
        assert {k: v for k, v in row.items() if k.startswith("data/mix/")} == {
            f"data/mix/{family}": count / 6 for family, count in families.items()}  # 3 prompts x 2 rollouts
