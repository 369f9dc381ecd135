"""The protocol's `feedback` variant (turn parsing and observation text, byte for byte), and what
both variants share: parsing never raises and is the regex's findall in linear time.
The `deepeyesv2` variant's rules are replayed against the release in test_release_rules.py."""

import json
from functools import partial

from hypothesis import given, settings
from hypothesis import strategies as st

from deepeyes.agent import protocol
from deepeyes.agent.protocol import (
    FEEDBACK,
    FORMAT_ERROR,
    VARIANTS,
    MAX_RETURNED_IMAGES,
    STOP_STRINGS,
    USER_PROMPT,
    Answer,
    CodeCall,
    EndEpisode,
    ImageSearchCall,
    InvalidCall,
    SearchCall,
    TextHit,
    extract_answer,
    find_all,
    render_code_observation,
    render_image_search,
    render_text_search,
    user_prompt,
)

parse_action = partial(protocol.parse_action, variant=FEEDBACK)

CODE_TURN = (
    "<think>The sign is small; zoom in.</think>\n<code>\n```python\n"
    "crop = image_1.crop((0, 0, 10, 10))\nplt.imshow(crop)\nplt.show()\n```\n</code>"
)


# --- parse_action: well-formed turns ---------------------------------------------------------


def test_answer_turn():
    assert parse_action("<think>It says 42.</think>\n<answer> 42 </answer>") == Answer("42")


def test_answer_is_read_after_the_last_think():
    turn = "<think>draft <answer>7</answer></think><think>no</think><answer>8</answer>"
    assert parse_action(turn) == Answer("8")


def test_empty_answer_ends_the_episode_without_text():
    assert parse_action("<think>x</think><answer>  </answer>") == Answer(None)


def test_lone_answer_tag_without_a_call_is_a_broken_answer():
    assert parse_action("<think>x</think><answer>42") == Answer(None)


def test_answer_tag_mentioned_while_thinking_does_not_stop_a_code_call():
    turn = "<think>Check first, then give <answer>.</think><code>\n```python\nprint(1)\n```\n</code>"
    assert parse_action(turn) == CodeCall("print(1)")


def test_code_turn():
    assert parse_action(CODE_TURN) == CodeCall(
        "crop = image_1.crop((0, 0, 10, 10))\nplt.imshow(crop)\nplt.show()"
    )


def test_last_python_block_of_the_last_code_is_taken():
    turn = (
        "<think>a</think><code>\n```python\nfirst = 1\n```\n</code>"
        "<think>b</think><code>\n```python\nsecond = 2\n```\nthen\n```python\nthird = 3\n```\n</code>"
    )
    assert parse_action(turn) == CodeCall("third = 3")


def test_search_turn():
    turn = (
        "<think>Who built it?</think>\n<tool_call>\n"
        '{"name": "search", "arguments": {"query": "Eiffel Tower architect"}}\n</tool_call>'
    )
    assert parse_action(turn) == SearchCall("Eiffel Tower architect")


def test_image_search_turn():
    turn = '<think>What is this?</think>\n<tool_call>\n{"name": "image_search"}\n</tool_call>'
    assert parse_action(turn) == ImageSearchCall()


def test_last_tool_call_is_taken():
    turn = (
        '<tool_call>{"name": "image_search"}</tool_call>'
        '<tool_call>{"name": "search", "arguments": {"query": "q"}}</tool_call>'
    )
    assert parse_action(turn) == SearchCall("q")


# --- parse_action: malformed turns become the released error observations ---------------------


def test_malformed_json():
    raw = '{"name": "search", "arguments": {"query": "q"}'
    action = parse_action(f"<tool_call>\n{raw}\n</tool_call>")
    assert action == InvalidCall(
        "none",
        f"Error: Invalid tool call format: {raw}. "
        "Error: Expecting ',' delimiter: line 1 column 47 (char 46)",
    )


def test_deeply_nested_json_is_a_format_error_not_a_crash():
    action = parse_action("<tool_call>" + "[" * 100_000 + "</tool_call>")
    assert isinstance(action, InvalidCall)
    assert action.observation.startswith("Error: Invalid tool call format: [[[")


def test_unknown_tool_name():
    raw = '{"name": "calculator", "arguments": {"x": 1}}'
    assert parse_action(f"<tool_call>{raw}</tool_call>") == InvalidCall(
        "none", f"Error: Invalid tool call name: {raw}."
    )


def test_tool_call_that_is_not_an_object():
    assert parse_action("<tool_call>[1, 2]</tool_call>") == InvalidCall(
        "none", "Error: Invalid tool call name: [1, 2]."
    )


def test_image_search_with_arguments():
    raw = '{"name": "image_search", "arguments": {"query": "cat"}}'
    assert parse_action(f"<tool_call>\n{raw}\n</tool_call>") == InvalidCall(
        "image_search", f"Error: Invalid tool call parameters for image search: {raw}."
    )


def test_search_without_query():
    for raw in (
        '{"name": "search"}',
        '{"name": "search", "arguments": {}}',
        '{"name": "search", "arguments": {"query": "  "}}',
        '{"name": "search", "arguments": {"query": 3}}',
        '{"name": "search", "arguments": "q"}',
    ):
        assert parse_action(f"<tool_call>{raw}</tool_call>") == InvalidCall(
            "search", f"Error: Invalid tool call parameters for search: {raw}."
        )


def test_code_without_python_block():
    assert parse_action("<think>x</think><code>print(1)</code>") == InvalidCall("code", FORMAT_ERROR)
    assert parse_action("<code>\n```\nprint(1)\n```\n</code>") == InvalidCall("code", FORMAT_ERROR)


def test_unclosed_code():
    assert parse_action("<code>\n```python\nprint(1)\n```\n") == InvalidCall("code", FORMAT_ERROR)


def test_unclosed_tool_call():
    assert parse_action('<tool_call>{"name": "image_search"}') == InvalidCall("none", FORMAT_ERROR)


def test_no_action_at_all():
    assert parse_action("<think>I am not sure.</think> Hmm.") == InvalidCall("none", "Format Error.")
    assert parse_action("") == InvalidCall("none", "Format Error.")


def test_extract_answer():
    assert extract_answer("a <answer>\n B \n</answer> <answer>C</answer>") == "B"
    assert extract_answer("<answer></answer>") is None
    assert extract_answer("no answer") is None


# --- observation text ------------------------------------------------------------------------


def test_code_observation_without_images():
    assert render_code_observation("42\n", "", 0) == (
        "Code execution result:\nstdout:\n```\n42\n\n```\n\nstderr:\n```\n\n```"
    )


def test_code_observation_with_two_images():
    assert render_code_observation("", "warn", 2) == (
        "Code execution result:\nstdout:\n```\n\n```\n\nstderr:\n```\nwarn\n```\n\n"
        "Images:\n<image><image>"
    )


def test_code_observation_caps_images_at_ten():
    observation = render_code_observation("", "", 12)
    assert MAX_RETURNED_IMAGES == 10
    assert observation.endswith("```\n\nImages:\n" + "<image>" * 10)
    assert observation.count("<image>") == 10


def test_text_search_observation():
    hits = [
        TextHit("Gustave Eiffel", "https://a.example", snippet="Engineer.", date="2024-01-02"),
        TextHit("Tower", "https://b.example"),
    ]
    assert render_text_search("eiffel", hits) == (
        "<tool_response>\n"
        "A Google search for 'eiffel' found 2 results:\n\n## Web Results\n"
        "1. [Gustave Eiffel](https://a.example)\nDate published: 2024-01-02\n\nEngineer."
        "\n\n"
        "2. [Tower](https://b.example)\n"
        "\n</tool_response>"
    )


def test_text_search_without_results():
    assert render_text_search("zzz", []) == (
        "<tool_response>\nNo results found for 'zzz'. Try with a more general query.\n</tool_response>"
    )


def test_image_search_observation():
    assert render_image_search(["A cat", "Cats"]) == (
        "<tool_response>\n"
        "A Google image search for the image found 2 results:\n\n## Web Results\n"
        "1. <image>\n[A cat] \n"
        "\n\n"
        "2. <image>\n[Cats] \n"
        "\n</tool_response>"
    )


def test_image_search_without_results():
    assert render_image_search([]) == (
        "<tool_response>\n"
        "No results found for the image. Try with text search or direct output the answer.\n"
        "</tool_response>"
    )


def test_user_prompt():
    assert USER_PROMPT.startswith("<image>\n")
    prompt = user_prompt("What is {x}?")
    assert prompt.startswith("<image>\nWhat is {x}?\n\nYou must put your answer inside <answer> </answer> tags")
    assert prompt.endswith("<think> <think> <answer> </answer>.")


def test_stop_strings():
    assert STOP_STRINGS == ("</code>", "</tool_call>")


# --- never raises --------------------------------------------------------------------------------

TAGS = [
    "<think>", "</think>", "<code>", "</code>", "<tool_call>", "</tool_call>",
    "<answer>", "</answer>", "```python\n", "```python", "\n```", "```", "\n",
]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
TOOL_CALLS = st.builds(
    lambda name, arguments, drop: json.dumps({"name": name} if drop else {"name": name, "arguments": arguments}),
    st.sampled_from(["search", "image_search", "calculator", ""]),
    st.one_of(JSON_VALUES, st.fixed_dictionaries({"query": JSON_VALUES})),
    st.booleans(),
)
PIECES = st.one_of(
    st.sampled_from(TAGS), st.text(max_size=12), JSON_VALUES.map(json.dumps), TOOL_CALLS
)


def _check(action):
    assert isinstance(action, (Answer, CodeCall, SearchCall, ImageSearchCall, InvalidCall, EndEpisode))
    if isinstance(action, (InvalidCall, EndEpisode)):
        assert action.tool in ("code", "search", "image_search", "none")
    if isinstance(action, InvalidCall):
        assert isinstance(action.observation, str) and action.observation
    if isinstance(action, SearchCall):
        assert isinstance(action.query, str)


@settings(max_examples=300, deadline=None)
@given(st.text(), st.sampled_from(VARIANTS))
def test_parse_action_never_raises_on_arbitrary_text(text, variant):
    _check(protocol.parse_action(text, variant))


@settings(max_examples=300, deadline=None)
@given(st.lists(PIECES, max_size=14).map("".join), st.sampled_from(VARIANTS))
def test_parse_action_never_raises_on_tag_soup(text, variant):
    _check(protocol.parse_action(text, variant))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(TAGS + ["x", " ", "  \n", "```python \n", "\n\n```"]), max_size=20).map("".join))
def test_bounded_find_all_equals_the_regex_findall(text):
    """find_all only searches up to the closing literal's last occurrence: the same matches."""
    for pattern in (protocol._ANSWER, protocol._CODE, protocol._PYTHON_BLOCK, protocol._TOOL_CALL):
        assert find_all(pattern, text) == pattern.findall(text)


def test_bounded_find_all_handles_the_python_block_edge_cases():
    for text in ("```python\n\n```", "```python \n  x\n```", "```python\n```", "```python\nx\n```python\ny\n```"):
        assert find_all(protocol._PYTHON_BLOCK, text) == protocol._PYTHON_BLOCK.findall(text)


def test_image_placeholder_is_the_schema_one():
    from deepeyes.agent import protocol
    from deepeyes.data import schema

    assert protocol.IMAGE_PLACEHOLDER == schema.IMAGE_PLACEHOLDER
