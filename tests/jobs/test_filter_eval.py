"""The difficulty filter and the evaluation on a scripted policy through the real agent loop and
real tools; then the three jobs as a user runs them."""

import json
import subprocess
import sys

import pytest

from deepeyes.agent.chat import ChatEncoder
from deepeyes.agent.loop import episode_seed
from deepeyes.agent.runtime import AgentRuntime, build_toolbox
from deepeyes.config import FilterConfig, RewardConfig, RolloutConfig, ToolsConfig
from deepeyes.data import read_records
from deepeyes.eval.benchmarks import load_benchmark
from deepeyes.eval.difficulty import judge, write_outputs
from deepeyes.eval.evaluate import evaluate, write_report
from deepeyes.model import load_processor
from deepeyes.model.pixels import PixelCache
from deepeyes.rollout.hf_engine import GenerateResult
from deepeyes.tools import LocalImageSearch
from tests.eval import formats
from tests.paths import REPO

SEARCH = '<think>look it up</think>\n<tool_call>\n{"name": "search", "arguments": {"query": "capital"}}\n</tool_call>'
WRONG = "<think>a guess</think>\n<answer>zebra crossing</answer>"


def answer(text):
    return f"<think>I know this</think>\n<answer>{text}</answer>"


class ScriptedPolicy:
    """The model, scripted: each request is answered with the turn its noise seed was scripted
    with (the seed names run, step, question, sample and turn), as the engine would return it."""

    def __init__(self, encoder: ChatEncoder, turns: dict[int, str], default: str = WRONG):
        self._encoder, self._turns, self._default = encoder, turns, default

    async def generate(self, request) -> GenerateResult:
        text = self._turns.get(request.sampling.seed, self._default)
        ids = self._encoder.content(text, [])
        ends_turn = "<answer>" in text
        ids = ids + [self._encoder.im_end] if ends_turn else ids
        return GenerateResult(ids, [0.0] * len(ids), "eos" if ends_turn else "stop", weight_version=0)

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def tools(tiny_dir, sample_data, tmp_path_factory):
    processor = load_processor(tiny_dir)
    encoder = ChatEncoder(processor.tokenizer, PixelCache(processor.image_processor, 3136, 50176).tokens)
    toolbox = build_toolbox(ToolsConfig(), sample_data.corpus, sample_data.image_index, tmp_path_factory.mktemp("scratch"))
    return encoder, toolbox


ROLLOUT = RolloutConfig(max_turns=3, max_turn_tokens=64, max_response_tokens=1024)


def test_filter_pass_counts_and_split(tools, sample_data, tmp_path):
    encoder, toolbox = tools
    records = read_records(sample_data.rl_train)[:5]
    cfg = FilterConfig(k=8, max_passes=2, prompts_per_batch=3)
    # question → (samples solved directly, samples solved after a search)
    plan = {0: (range(8), ()), 1: ((), (0, 5)), 2: ((3,), ()), 3: ((), ()), 4: ((), (1, 2, 7))}
    turns = {}
    for index, (direct, searched) in plan.items():
        step, group = divmod(index, cfg.prompts_per_batch)
        for sample in direct:
            turns[episode_seed(0, step, group, sample, 0)] = answer(records[index].answer)
        for sample in searched:
            turns[episode_seed(0, step, group, sample, 0)] = SEARCH
            turns[episode_seed(0, step, group, sample, 1)] = answer(records[index].answer)
    runtime = AgentRuntime(ScriptedPolicy(encoder, turns), encoder, toolbox)

    verdicts = judge(runtime, records, cfg, ROLLOUT, RewardConfig())
    assert [(v.pass_count, v.passes_with_tools, v.split) for v in verdicts] == [
        (8, 0, "too_easy"), (2, 2, "rl"), (1, 0, "cold_start"), (0, 0, "cold_start"), (3, 3, "too_easy")]
    assert verdicts[1].tool_calls == 2

    summary = write_outputs(tmp_path, verdicts, cfg.k, cfg.max_passes)
    assert summary["total"] == {"questions": 5, "rl": 1, "cold_start": 2, "too_easy": 2,
                                "mean_pass_rate": pytest.approx(14 / 40), "pass_at_k": 0.8}
    assert summary["pass_count_histogram"]["8"] == 1 and summary["by_data_source"]["sample"]["questions"] == 5
    assert sum(f["questions"] for f in summary["by_family"].values()) == 5
    [rl] = read_records(tmp_path / "rl.jsonl")
    assert rl.id == records[1].id and rl.metadata["pass_count"] == 2 and rl.metadata["k"] == 8
    assert len(read_records(tmp_path / "cold_start.jsonl")) == 2
    assert len((tmp_path / "pass_counts.jsonl").read_text().splitlines()) == 5


@pytest.mark.parametrize("tools_on", [True, False])
def test_eval_on_every_benchmark_adapter(tools, tmp_path, tools_on):
    """Even questions are answered right at once; odd ones search first, then answer right."""
    encoder, toolbox = tools
    all_metrics = []
    for name, layout, path, image_root in formats.all_benchmarks(tmp_path):
        bench = load_benchmark(name, layout, path, image_root, tmp_path / "cache", on_error="skip")
        turns = {}
        for index, record in enumerate(bench.records):
            step, group = divmod(index, 2)  # two questions per batch
            right = record.metadata.get("alternative_answers", [record.answer])[0] if index == 0 else record.answer
            if index % 2:
                turns[episode_seed(0, step, group, 0, 0)] = SEARCH
                turns[episode_seed(0, step, group, 0, 1)] = answer(right)
            else:
                turns[episode_seed(0, step, group, 0, 0)] = answer(right)
        runtime = AgentRuntime(ScriptedPolicy(encoder, turns), encoder, toolbox)
        batches = []
        metrics, trajectories = evaluate(runtime, bench, tools_on, ROLLOUT, RewardConfig(), questions_per_batch=2,
                                         after_batch=lambda: batches.append(1))
        assert len(batches) == (len(bench.records) + 1) // 2
        n = len(bench.records)
        solved = n if tools_on else (n + 1) // 2  # without tools the searching half never answers
        assert metrics["accuracy"] == pytest.approx(solved / n), name
        assert metrics["answers_with_tools"] == pytest.approx((n // 2) / n if tools_on else 0.0), name
        assert metrics["tool_calls"]["text_search"] == (n // 2 if tools_on else 0)
        assert sum(c["n"] for c in metrics["categories"].values()) == n
        all_metrics.append(metrics)
    by_name = {m["benchmark"]: m for m in all_metrics}
    assert by_name["mmsearch"]["skipped_rows"] == 1  # the text-only question
    assert set(by_name["realx"]["capabilities"]) == {"perception", "reasoning", "search", "all_three"}
    assert set(by_name["mme_realworld"]["categories"]) == {"Perception/Remote Sensing", "Reasoning/Autonomous Driving"}
    report = write_report(tmp_path / "report", all_metrics)
    assert report["tool_use_share"].stat().st_size > 0


def run_job(script, *overrides, cwd):
    result = subprocess.run([sys.executable, str(REPO / "jobs" / script), *overrides], cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [run_dir] = [p.parent for p in cwd.rglob(".hydra")]
    return run_dir


SMALL = ["rollout.max_turn_tokens=16", "rollout.max_response_tokens=48", "rollout.max_turns=2"]


@pytest.mark.slow
def test_eval_job_embedded_default_writes_report_and_plots(tmp_path):
    rl_run = tmp_path / "rl_run"
    rl_run.mkdir()
    (rl_run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "reward/mean": 0.1 * s, "rollout/response_tokens": 50, "tools/code_calls": 1.0}) + "\n"
        for s in (1, 2)))
    run_dir = run_job("eval.py", "benchmark.limit=3", "logger.mode=disabled", f"eval.training_run={rl_run}", *SMALL,
                      cwd=tmp_path)
    [metrics] = json.loads((run_dir / "report.json").read_text())
    assert metrics["benchmark"] == "sample" and metrics["samples"] == 3
    assert (run_dir / "report.md").read_text().startswith("| benchmark |")
    assert len((run_dir / "predictions.jsonl").read_text().splitlines()) == 3
    for plot in ("tool_use_share", "tool_distribution", "training_curves"):
        assert (run_dir / "plots" / f"{plot}.png").stat().st_size > 1000


@pytest.mark.slow
def test_filter_job_writes_splits_and_summary(tmp_path):
    run_dir = run_job("filter.py", "filter.limit=2", "filter.k=2", *SMALL, cwd=tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["total"]["questions"] == 2 and summary["k"] == 2
    written = sum(len(read_records(run_dir / f"{split}.jsonl")) for split in ("rl", "cold_start", "too_easy"))
    assert written == 2


@pytest.mark.slow
def test_prepare_data_job_converts_rl_parquet_and_search_cache(tmp_path):
    from tests.data.test_converters import png_bytes, verl_row, write_parquet

    write_parquet(tmp_path / "search.parquet", [verl_row(0), verl_row(1, image=png_bytes("blue"))])
    (tmp_path / "cached").mkdir()
    (tmp_path / "cached" / "r.png").write_bytes(png_bytes("green"))
    (tmp_path / "cache.json").write_text(json.dumps(
        {"fvqa_train_1": {"tool_returned_web_title": ["Blue"], "cached_images_path": ["r.png"]}}))
    out = tmp_path / "converted"
    run_job("prepare_data.py", f"prepare.rl=[{tmp_path / 'search.parquet'}]", f"prepare.out_dir={out}",
            f"prepare.search_cache={tmp_path / 'cache.json'}", f"prepare.search_cache_images={tmp_path / 'cached'}",
            cwd=tmp_path)
    assert len(read_records(out / "rl_train.jsonl")) == 2
    assert len(LocalImageSearch.from_jsonl(out / "image_index.jsonl")) == 1
    report = json.loads((out / "conversion.json").read_text())
    assert report["rl"]["written"] == {str(tmp_path / "search.parquet"): 2}


def composed(job, *overrides):
    from hydra import compose, initialize_config_dir

    from deepeyes.config import register_configs
    from tests.paths import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(job, overrides=["run.out_dir=unused", *overrides])


@pytest.mark.parametrize("name", ["realx", "vstar", "hrbench", "mme_realworld", "mathverse", "mmsearch"])
def test_every_benchmark_config_composes_and_needs_its_file(name):
    from deepeyes.config import EvalJobConfig, to_object

    with pytest.raises(ValueError, match="benchmark.path"):
        to_object(composed("eval", f"benchmark={name}"))
    cfg = to_object(composed("eval", f"benchmark={name}", "benchmark.path=/data/x", "benchmark.tools=false"))
    assert isinstance(cfg, EvalJobConfig) and (cfg.benchmark.format, cfg.benchmark.tools) == (name, False)


def test_filter_and_prepare_data_configs_reject_typos_and_bad_values():
    from hydra.errors import ConfigCompositionException

    from deepeyes.config import FilterJobConfig, PrepareDataJobConfig, to_object

    cfg = to_object(composed("filter"))
    assert isinstance(cfg, FilterJobConfig) and (cfg.filter.k, cfg.filter.max_passes) == (8, 2)
    assert isinstance(to_object(composed("prepare_data")), PrepareDataJobConfig)
    with pytest.raises(ConfigCompositionException, match="filter.kk"):
        composed("filter", "filter.kk=4")
    with pytest.raises(ValueError, match="filter.k=0"):
        to_object(composed("filter", "filter.k=0"))
    with pytest.raises(ValueError, match="eval.grader"):
        to_object(composed("eval", "eval.grader=gpt"))
