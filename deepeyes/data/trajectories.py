"""Programmatic cold-start trajectories for the sample tasks, in the exact DeepEyesV2 protocol.

Each trajectory is the conversation a competent agent would have: think, call one tool, read
the real result, answer. Tool results are real: each code cell is executed (in-process, with
the notebook's `image_1`.. and `display()`), the images it displays are saved as PNGs, and
search observations are what the given search objects return. A trajectory whose observations
do not contain its answer is a bug in the generator and raises, so SFT never teaches guessing
(a lookup about an unlisted island answers "unknown" only when no result names that island).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from PIL import Image

from deepeyes.agent.protocol import (
    IMAGE_SEARCH,
    SYSTEM_PROMPT,
    TEXT_SEARCH,
    TextHit,
    render_code_observation,
    render_image_search,
    render_text_search,
    user_prompt,
)
from deepeyes.data.schema import Message, Record, SFTRecord

# As the rollout tool session's default: both searches return their top 5.
SEARCH_TOP_K = 5
ZOOM = 4


class TextSearch(Protocol):
    def search(self, query: str, k: int) -> list[TextHit]: ...


class ImageSearch(Protocol):
    def search(self, image: Path, k: int) -> list[tuple[str, Path]]: ...


def cold_start_trajectory(
    record: Record, text_search: TextSearch, image_search: ImageSearch, image_dir: Path, recipe: str = "default"
) -> SFTRecord:
    """The trajectory that solves a sample task (`record` from `sample_tasks`, with its
    metadata); images produced by code cells are written into `image_dir`.

    With the "learning" recipe the thoughts are short fixed sentences (`BRIEF_THOUGHTS`), so that
    everything a tiny model must copy sits in tool arguments and answers, and a perception (color)
    task is solved by code that prints the color it measures."""
    conversation = _Conversation(record)
    brief = recipe == "learning"
    if record.family == "perception" and brief:
        _perception_by_measuring(conversation, record)
    elif record.family == "perception":
        _perception(conversation, record, image_dir)
    elif record.family == "arithmetic":
        _arithmetic(conversation, record, brief)
    elif record.family == "lookup":
        _lookup(conversation, record, text_search, image_search, brief)
    else:
        raise ValueError(f"{record.id}: no cold-start trajectory for family {record.family!r}")
    return conversation.finish()


class _Conversation:
    def __init__(self, record: Record):
        self.record = record
        self.messages = [Message("system", SYSTEM_PROMPT), Message("user", user_prompt(record.question))]
        self.images = list(record.images)

    def code(self, think: str, code: str) -> None:
        self._assistant(f"<think> {think} </think>\n<code>\n```python\n{code}\n```\n</code>")

    def tool_call(self, think: str, call: dict) -> None:
        self._assistant(f"<think> {think} </think>\n<tool_call>\n{json.dumps(call)}\n</tool_call>")

    def observe(self, text: str, images: Sequence[Path] = ()) -> None:
        self.messages.append(Message("user", text))
        self.images += images

    def answer(self, think: str, text: str | None = None) -> None:
        """The final turn; its answer is the record's unless the trajectory read another
        spelling of it from a tool."""
        self._assistant(f"<think> {think} </think>\n<answer>{text or self.record.answer}</answer>")

    def _assistant(self, text: str) -> None:
        self.messages.append(Message("assistant", text))

    def finish(self) -> SFTRecord:
        return SFTRecord(
            id=self.record.id,
            messages=tuple(self.messages),
            images=tuple(self.images),
            family=self.record.family,
            data_source=self.record.data_source,
        )


def _perception(conversation: _Conversation, record: Record, image_dir: Path) -> None:
    region = record.metadata["region"]
    left, top, right, bottom = record.metadata["crop_box"]
    size = ((right - left) * ZOOM, (bottom - top) * ZOOM)
    # display() rather than plt.imshow + plt.show: the notebook returns a displayed PIL image
    # as-is, while a figure adds axes and margins around it and costs more image tokens.
    code = (
        "from PIL import Image\n\n"
        f"crop = image_1.crop(({left}, {top}, {right}, {bottom})).resize({size}, Image.NEAREST)\n"
        "display(crop)"
    )
    conversation.code(
        f"The question asks about the small box in the {region} corner. It is too small to make "
        f"out at this size, so I will crop that corner and zoom in {ZOOM}x.",
        code,
    )
    stdout, shown = _run_cell(code, record.images)
    image_dir.mkdir(parents=True, exist_ok=True)
    paths = [image_dir / f"{record.id}-cell1-{index}.png" for index in range(1, len(shown) + 1)]
    for image, path in zip(shown, paths):
        image.save(path, format="PNG")
    conversation.observe(render_code_observation(stdout, "", len(paths)), paths)
    if record.metadata["variant"] == "digit":
        seen = f"the digit {record.answer}"
    else:
        seen = f"a small {record.answer} square"
    conversation.answer(f"The zoomed crop of the {region} corner shows {seen} inside the box.")


# The learning recipe's thoughts: one fixed sentence per step, whatever the task.
BRIEF_THOUGHTS = {
    "measure": "I will crop the image row by row and measure the color of the square.",
    "measured": "The code printed the color.",
    "compute": "I will compute it with Python.",
    "computed": "The code printed the result.",
    "image_search": "I will search for the flag.",
    "text_search": "I will search for it.",
    "searched": "The first result says it.",
    "not_found": "No result is about it.",
}

# The learning recipe's cell. Its colors are pure channels and only the asked corner's box holds a
# square; the background, boxes and outlines are near grey and the clutter is muted (saturation at
# most 110, green's is 130). So the image's pixel rows that cross the square are exactly those
# with a pixel more saturated than 120, and that pixel's strongest channel names the color: the
# cell prints it once per row of the square (LEARNING_SQUARE = 12 times), in capitals (it names the
# colors in lower case). The repetition is what lets a tiny model learn to carry the color over: the
# answer position sees it among ~1300 tokens of context (the system prompt alone is 950). With one
# occurrence its teacher-forced copy accuracy stayed at chance for 200 SFT steps. With 6 (a 6-pixel
# square), after 300 steps it told one color apart and confused the other two (probability of the
# right one 0.38-0.52 for those, at seeds 0 and 1), and RL then taught the confusion (green answered
# BLUE); with 12 it was 0.91-0.96 for every color at both seeds.
_MEASURE_COLOR = """for row in range(image_1.height):
    pixel = max(image_1.crop((0, row, image_1.width, row + 1)).get_flattened_data(), key=lambda p: max(p) - min(p))
    if max(pixel) - min(pixel) > 120:
        print(("red", "green", "blue")[pixel.index(max(pixel))].upper())"""


def _perception_by_measuring(conversation: _Conversation, record: Record) -> None:
    if record.metadata["variant"] != "color":
        raise ValueError(f"{record.id}: only color questions can be answered by measuring, not {record.metadata['variant']!r}")
    conversation.code(BRIEF_THOUGHTS["measure"], _MEASURE_COLOR)
    stdout, _ = _run_cell(_MEASURE_COLOR, record.images)
    if set(stdout.split()) != {record.answer.upper()}:
        raise ValueError(f"{record.id}: the measuring cell printed {stdout!r}, but the answer is {record.answer!r}")
    conversation.observe(render_code_observation(stdout, "", 0))
    conversation.answer(BRIEF_THOUGHTS["measured"], record.answer.upper())


def direct_answer_trajectory(record: Record) -> SFTRecord:
    """A cold start that answers at once, without any tool: on purpose, for a deliberately
    imperfect SFT set (`no_tool` in `sample_tasks`) that reinforcement learning must fix."""
    conversation = _Conversation(record)
    conversation.answer("I can answer this directly from the image.")
    return conversation.finish()


def _arithmetic(conversation: _Conversation, record: Record, brief: bool) -> None:
    expression = record.metadata["expression"]
    code = f"print({expression})"
    think = BRIEF_THOUGHTS["compute"] if brief else f"I need the exact value of {expression}. I will compute it with Python."
    conversation.code(think, code)
    stdout, _ = _run_cell(code, record.images)
    result = stdout.strip()
    if result != record.answer:
        raise ValueError(f"{record.id}: {code} printed {result!r}, but the answer is {record.answer!r}")
    conversation.observe(render_code_observation(stdout, "", 0))
    conversation.answer(BRIEF_THOUGHTS["computed"] if brief else f"The code printed {result}, so {expression} = {result}.")


def _run_cell(code: str, images: Sequence[Path]) -> tuple[str, list[Image.Image]]:
    """Run a generated cell as the sandbox notebook would (image_1.. preloaded, display() returns
    images), but in this process: the code is ours, not model output. Returns stdout and the
    displayed images."""
    shown: list[Image.Image] = []
    with contextlib.ExitStack() as stack:
        namespace = {f"image_{i}": stack.enter_context(Image.open(path)) for i, path in enumerate(images, 1)}
        namespace["display"] = lambda *objects: shown.extend(objects)
        stdout = stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        exec(code, namespace)
        return stdout.getvalue(), [image.copy() for image in shown]


def _lookup(
    conversation: _Conversation, record: Record, text_search: TextSearch, image_search: ImageSearch, brief: bool
) -> None:
    entity, attribute, query = (record.metadata[key] for key in ("entity", "attribute", "query"))
    if record.metadata["variant"] == "flag":
        conversation.tool_call(
            BRIEF_THOUGHTS["image_search"] if brief else
            "I do not recognize the flag in the image. I will run an image search to find out which island it belongs to.",
            {"name": IMAGE_SEARCH},
        )
        results = image_search.search(record.images[0], SEARCH_TOP_K)
        titles = [title for title, _ in results]
        if not titles or titles[0] != f"Flag of {entity}":
            raise ValueError(f"{record.id}: image search does not put {entity} first: {titles}")
        conversation.observe(render_image_search(titles), [path for _, path in results])
        think = (
            f'The top image search result is "{titles[0]}", so this is the flag of {entity}. '
            f"Now I will search for the {attribute} of {entity}."
        )
    else:
        think = f"I do not know the {attribute} of {entity}. I will search for it."
    conversation.tool_call(BRIEF_THOUGHTS["text_search"] if brief else think, {"name": TEXT_SEARCH, "arguments": {"query": query}})
    hits = text_search.search(query, SEARCH_TOP_K)
    if record.metadata["variant"] == "unlisted":
        if any(entity in f"{hit.title} {hit.snippet}" for hit in hits):
            raise ValueError(f"{record.id}: search for {query!r} finds {entity}, which no page should name")
        conversation.observe(render_text_search(query, hits))
        conversation.answer(BRIEF_THOUGHTS["not_found"] if brief else f"No result is about {entity}: its {attribute} is unknown.")
        return
    if not hits or record.answer not in hits[0].snippet:
        raise ValueError(f"{record.id}: the top search hit for {query!r} does not state {record.answer!r}")
    conversation.observe(render_text_search(query, hits))
    conversation.answer(
        BRIEF_THOUGHTS["searched"] if brief else
        f'The first result, "{hits[0].title}", says the {attribute} of {entity} is {record.answer}.'
    )
