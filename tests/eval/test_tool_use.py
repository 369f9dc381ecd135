"""The tool-call classifier on representative code, and counting calls from model turns."""

import pytest

from deepeyes.agent.trajectory import ToolCall, Trajectory
from deepeyes.data import Record
from deepeyes.eval.tool_use import classify_code, tool_kinds


@pytest.mark.parametrize(
    "code, kind",
    [
        ("crop = image_1.crop((100, 50, 300, 250))\ncrop = crop.resize((400, 400))\ndisplay(crop)", "crop"),
        ("import numpy as np\narr = np.array(image_1)\nregion = arr[120:240, 30:90]\nplt.imshow(region)\nplt.show()", "crop"),
        ("from PIL import ImageDraw\ndraw = ImageDraw.Draw(image_1)\ndraw.rectangle([10, 10, 50, 50], outline='red')\n"
         "display(image_1)", "mark"),
        ("import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.imshow(image_1)\n"
         "ax.add_patch(plt.Rectangle((5, 5), 20, 20, fill=False))\nplt.show()", "mark"),
        ("print(4837 * 29)", "numerical"),
        ("import math\nangle = math.atan2(3, 4)\nprint(math.degrees(angle))", "numerical"),
        ("values = [12.5, 13.1, 9.8]\nprint(sum(values) / len(values))", "numerical"),
        ("print(image_1.size)", "other_code"),
        ("display(image_1)", "other_code"),
    ],
)
def test_classify_code(code, kind):
    assert classify_code(code) == kind


def test_tool_kinds_reads_the_models_turns(tmp_path):
    record = Record("r", "q", (tmp_path / "a.png",), "1", "f")
    turns = [
        "<think>zoom</think><code>\n```python\nimage_1.crop((0, 0, 8, 8))\n```\n</code>",
        '<think>look up</think><tool_call>{"name": "search", "arguments": {"query": "Veldoria capital"}}</tool_call>',
        '<think>which place</think><tool_call>{"name": "image_search"}</tool_call>',
        "<think>broken</think><code>no python block</code>",
        "<think>done</think><answer>1</answer>",
    ]
    calls = [ToolCall(tool, ok, 0.1) for tool, ok in [("code", True), ("search", True), ("image_search", True), ("code", False)]]
    trajectory = Trajectory(record=record, group=0, prompt_ids=[], model_turns=turns, tool_calls=calls)
    assert tool_kinds(trajectory) == ["crop", "text_search", "image_search"]
    trajectory.model_turns[-1] = turns[0]  # cut by the turn limit: the last call never ran
    assert tool_kinds(trajectory) == ["crop", "text_search", "image_search"]
