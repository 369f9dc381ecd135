"""The RL job's end-of-run summary: what moved between the first and the last step's rollouts."""

from pathlib import Path

from deepeyes.agent.trajectory import ToolCall, Trajectory
from deepeyes.data.schema import Record
from deepeyes.train.grpo import rollout_metrics
from deepeyes.train.rl import what_moved


def rollout(family: str, reward: float, accuracy: float, format_: float, tools: tuple[str, ...]) -> Trajectory:
    record = Record(id=f"{family}-0", question="q", images=(Path("image.png"),), answer="a", family=family)
    return Trajectory(record=record, group=0, prompt_ids=[], model_turns=["turn"], weight_versions={0},
                      tool_calls=[ToolCall(tool, True, 0.1) for tool in tools], reward=reward, accuracy=accuracy,
                      format=format_)


def test_the_summary_puts_the_first_and_last_steps_rollouts_side_by_side():
    first = [rollout("perception", 0.0, 0.0, 0.0, ()), rollout("lookup", 0.2, 0.0, 1.0, ("search",))]
    last = [rollout("perception", 1.0, 1.0, 1.0, ("code", "code")), rollout("lookup", 0.2, 0.0, 1.0, ("search",)),
            rollout("arithmetic", 0.2, 0.0, 1.0, ("code",))]
    summary = what_moved((1, rollout_metrics(first, 0)), (3, rollout_metrics(last, 2)))
    assert summary.startswith("[bold]step 1 -> step 3:[/] ")
    for moved in ("reward 0.10 -> 0.47", "accuracy 0.00 -> 0.33", "format 0.50 -> 1.00", "code calls 0.00 -> 1.00",
                  "searches 0.50 -> 0.33", "image searches 0.00 -> 0.00",
                  "perception accuracy 0.00 -> 1.00", "lookup accuracy 0.00 -> 0.00"):
        assert moved in summary
    assert "arithmetic" not in summary  # only families both steps sampled can be compared
