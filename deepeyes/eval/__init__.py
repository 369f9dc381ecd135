"""Evaluation and data curation with the training agent loop: benchmark adapters, the difficulty
filter, metrics, the tool-use analysis and its plots."""

from deepeyes.eval.benchmarks import Benchmark, load_benchmark
from deepeyes.eval.difficulty import run_filter
from deepeyes.eval.evaluate import GRADERS, run_eval
from deepeyes.eval.metrics import benchmark_metrics
from deepeyes.eval.tool_use import TOOL_KINDS, classify_code, tool_kinds

__all__ = [
    "GRADERS",
    "TOOL_KINDS",
    "Benchmark",
    "benchmark_metrics",
    "classify_code",
    "load_benchmark",
    "run_eval",
    "run_filter",
    "tool_kinds",
]
