"""Metrics per benchmark, category and RealX capability; the report table; the plots."""

import json

import numpy as np
import pytest
from PIL import Image

from deepeyes.agent.trajectory import ToolCall, Trajectory
from deepeyes.data import Record
from deepeyes.eval.evaluate import combine_reports, write_report
from deepeyes.eval.metrics import benchmark_metrics, flat_metrics
from deepeyes.eval.plots import plot_training_curves

CROP = "<code>\n```python\nimage_1.crop((0, 0, 4, 4))\n```\n</code>"
SEARCH = '<tool_call>{"name": "search", "arguments": {"query": "q"}}</tool_call>'


def trajectory(tmp_path, rid, category, accuracy, turns, capabilities=None):
    metadata = {"category": category} | ({"capabilities": capabilities} if capabilities else {})
    record = Record(rid, "q", (tmp_path / "a.png",), "a", category, "realx", metadata)
    t = Trajectory(record=record, group=0, prompt_ids=[], model_turns=turns + ["<answer>a</answer>"],
                   tool_calls=[ToolCall("code", True, 0.1) for _ in turns])
    t.accuracy, t.answer = accuracy, "a"
    return t


@pytest.fixture
def realx_run(tmp_path):
    return [
        trajectory(tmp_path, "1", "perception", 1.0, [CROP], ["perception"]),
        trajectory(tmp_path, "2", "all", 0.0, [SEARCH, CROP], ["perception", "reasoning", "search"]),
        trajectory(tmp_path, "3", "all", 1.0, [], ["perception", "reasoning", "search"]),
        trajectory(tmp_path, "4", "search", 1.0, [SEARCH], ["search"]),
    ]


def test_accuracy_per_category_capability_and_all_three(realx_run):
    m = benchmark_metrics("realx", realx_run, tools=True)
    assert m["accuracy"] == 0.75 and m["questions"] == 4
    assert {k: m["categories"]["all"][k] for k in ("n", "accuracy")} == {"n": 2, "accuracy": 0.5}
    assert m["capabilities"]["perception"] == {"n": 3, "accuracy": pytest.approx(2 / 3)}
    assert m["capabilities"]["search"]["accuracy"] == pytest.approx(2 / 3)
    assert m["capabilities"]["all_three"] == {"n": 2, "accuracy": 0.5}
    assert m["answers_with_tools"] == 0.75 and m["accuracy_without_tools"] == 1.0
    assert m["tool_calls"] == {"crop": 2, "numerical": 0, "mark": 0, "other_code": 0, "image_search": 0, "text_search": 2}
    assert flat_metrics(m)["eval/realx/capabilities/all_three"] == 0.5


def test_format_and_tool_calls_per_category(realx_run):
    realx_run[1].format = realx_run[2].format = 1.0
    m = benchmark_metrics("realx", realx_run, tools=True)
    assert m["format_rate"] == 0.5
    both = m["categories"]["all"]
    assert both["format_rate"] == 1.0 and both["tool_calls_per_trajectory"] == 1.0
    assert both["tool_calls"] | {"crop": 0, "text_search": 0} == dict.fromkeys(both["tool_calls"], 0)
    assert (both["tool_calls"]["crop"], both["tool_calls"]["text_search"]) == (1, 1)
    assert m["categories"]["search"]["tool_calls"]["text_search"] == 1 and m["categories"]["search"]["format_rate"] == 0.0


def test_report_and_plots_are_written_and_not_blank(tmp_path, realx_run):
    other = benchmark_metrics("vstar", realx_run[:2], tools=False)
    paths = write_report(tmp_path / "out", [benchmark_metrics("realx", realx_run, tools=True), other])
    assert json.loads(paths["report_json"].read_text())[1]["benchmark"] == "vstar"
    table = paths["report_md"].read_text()
    assert "| realx | on | all_three | 2 | 50.0 | |" in table and "| vstar | off | all | 2 |" in table
    for name in ("tool_use_share", "tool_distribution"):
        assert_drawn(paths[name])


def test_training_curves_from_metrics_jsonl(tmp_path):
    rows = [{"step": s, "reward/mean": 0.1 * s, "rollout/response_tokens": 100 + s, "tools/code_calls": 0.5,
             "tools/search_calls": 0.25, "tools/image_search_calls": 0.0} for s in (1, 2, 3)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = np.asarray(Image.open(plot_training_curves(metrics, tmp_path / "training.png")))
    assert_drawn(tmp_path / "training.png")
    # Per-family accuracy, where logged, gets a panel of its own (a family may miss a step).
    rows[0] |= {"accuracy/perception": 0.25, "accuracy/lookup": 0.0}
    rows[1] |= {"accuracy/perception": 0.5}
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_family = np.asarray(Image.open(plot_training_curves(metrics, tmp_path / "families.png")))
    assert by_family.shape[1] > plain.shape[1]
    metrics.write_text(json.dumps({"step": 0, "eval/x/accuracy": 0.5}) + "\n")
    with pytest.raises(ValueError, match="no RL step metrics"):
        plot_training_curves(metrics, tmp_path / "none.png")


def assert_drawn(path):
    pixels = np.asarray(Image.open(path).convert("L"))
    assert pixels.shape[0] > 100 and (pixels < 200).mean() > 0.01  # axes, bars and text drawn


def test_a_multirun_over_benchmarks_gets_one_combined_report(tmp_path, realx_run):
    for run, name in (("0", "realx"), ("1", "vstar")):
        write_report(tmp_path / "sweep" / run, [benchmark_metrics(name, realx_run, tools=True)])
    paths = combine_reports(tmp_path / "sweep")
    assert [m["benchmark"] for m in json.loads(paths["report_json"].read_text())] == ["realx", "vstar"]
    assert paths["tool_use_share"].parent == tmp_path / "sweep" / "plots"
    with pytest.raises(FileNotFoundError, match="no \\*/report.json"):
        combine_reports(tmp_path / "empty")
