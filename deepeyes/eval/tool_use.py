"""What the agent used its tools for, as the paper's analysis counts it.

A tool call is one of TOOL_KINDS: code cells are classified from their content (crop, numerical
analysis, mark, other code), search calls by their tool. The classification reads the model's
own turns (the code it wrote), not the observations.
"""

from __future__ import annotations

import re
from collections import Counter

from deepeyes.agent import protocol
from deepeyes.agent.trajectory import Trajectory

TOOL_KINDS = ("crop", "numerical", "mark", "other_code", "image_search", "text_search")

# Cutting out or zooming into a region: PIL crop/resize, 2-D slicing of an image array.
_CROP = re.compile(r"\.crop\s*\(|\.resize\s*\(|\.thumbnail\s*\(|\[\s*[^\[\]]*:[^\[\]]*,\s*[^\[\]]*:[^\[\]]*\]")
# Drawing on the image: ImageDraw shapes and text, cv2 drawing, matplotlib patches and markers.
_MARK = re.compile(
    r"ImageDraw|\.rectangle\s*\(|\.ellipse\s*\(|\.line\s*\(|\.polygon\s*\(|cv2\.(rectangle|circle|line|putText)"
    r"|patches\.|add_patch|\.scatter\s*\(|\.annotate\s*\(|plt\.(plot|text|axhline|axvline)\s*\("
)
# Computing numbers: numpy/math/statistics/sympy, or arithmetic on literals.
_NUMERICAL = re.compile(
    r"\b(np|numpy|math|statistics|sympy|scipy)\.|\b(sum|min|max|round|abs|len|sorted)\s*\("
    r"|\d\s*[-+*/%]\s*\d|\*\*"
)


def classify_code(code: str) -> str:
    """The kind of one code cell: "crop", "mark", "numerical" or "other_code" (first that applies)."""
    if _CROP.search(code):
        return "crop"
    if _MARK.search(code):
        return "mark"
    if _NUMERICAL.search(code):
        return "numerical"
    return "other_code"


def tool_kinds(trajectory: Trajectory) -> list[str]:
    """The kind of each tool call the trajectory made, in order. Only calls that ran count: not
    malformed ones, nor one written in a last turn the loop never executed."""
    kinds = []
    # The loop executes one call per turn, in order, for every turn but the last.
    for turn in trajectory.model_turns[: len(trajectory.tool_calls)]:
        action = protocol.parse_action(turn)
        if isinstance(action, protocol.CodeCall):
            kinds.append(classify_code(action.code))
        elif isinstance(action, protocol.SearchCall):
            kinds.append("text_search")
        elif isinstance(action, protocol.ImageSearchCall):
            kinds.append("image_search")
    return kinds


def tool_kind_counts(trajectories: list[Trajectory]) -> Counter:
    return Counter(kind for trajectory in trajectories for kind in tool_kinds(trajectory))
