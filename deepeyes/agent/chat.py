"""Token-level assembly of Qwen2.5-VL chat turns, shared by SFT and RL.

RL keeps the model's own sampled token ids and appends observation tokens around them, so the
conversation is assembled here token by token rather than by re-rendering a chat template over
decoded text (re-tokenizing model output would train on tokens the model never sampled).
SFT encodes whole conversations with the same pieces, so both see identical token boundaries:

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{text with <|vision_start|><|image_pad|>*N<|vision_end|>}<|im_end|>\\n
    <|im_start|>assistant\\n{model turn}<|im_end|>\\n ...

Text that did not come from us (questions, tool output) is tokenized with special tokens split,
so a program printing "<|im_end|>" or "<|image_pad|>" cannot forge turn or image boundaries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from deepeyes.data.schema import IMAGE_PLACEHOLDER, Message


class ChatEncoder:
    def __init__(self, tokenizer, image_tokens: Callable[[Path], int]):
        self._tokenizer = tokenizer
        self._image_tokens = image_tokens
        ids = tokenizer.convert_tokens_to_ids
        self.im_start = ids("<|im_start|>")
        self.im_end = ids("<|im_end|>")
        self.vision_start = ids("<|vision_start|>")
        self.vision_end = ids("<|vision_end|>")
        self.image_pad = ids("<|image_pad|>")
        self.newline = self.text("\n")

    def text(self, text: str) -> list[int]:
        """Plain text, special tokens split: "<|im_end|>" in it stays text."""
        if not text:
            return []
        return self._tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        """A model turn as text, without the end-of-turn token."""
        text = self._tokenizer.decode(list(ids), skip_special_tokens=False)
        for end in ("<|im_end|>", "<|endoftext|>"):
            text = text.removesuffix(end)
        return text

    def content(self, text: str, images: Sequence[Path]) -> list[int]:
        """A message body; each <image> placeholder takes the next image, in order."""
        pieces = text.split(IMAGE_PLACEHOLDER)
        if len(pieces) - 1 != len(images):
            raise ValueError(
                f"message has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images"
            )
        ids = self.text(pieces[0])
        for image, piece in zip(images, pieces[1:]):
            ids += self.image(image) + self.text(piece)
        return ids

    def image(self, image: Path) -> list[int]:
        return [self.vision_start] + [self.image_pad] * self._image_tokens(image) + [self.vision_end]

    def header(self, role: str) -> list[int]:
        return [self.im_start] + self.text(f"{role}\n")

    def message(self, role: str, text: str, images: Sequence[Path] = ()) -> list[int]:
        return self.header(role) + self.content(text, images) + [self.im_end] + self.newline

    def prompt(self, system: str, user: str, images: Sequence[Path]) -> list[int]:
        """System and first user message, ending where the model's first turn begins."""
        return self.message("system", system) + self.message("user", user, images) + self.header("assistant")

    def pieces(self, pieces: Sequence[str], images: Sequence[Path]) -> list[int]:
        """A message body given as the text around its images: len(pieces) == len(images) + 1.
        Unlike `content`, an "<image>" inside the text (a program may print one) stays text."""
        if len(pieces) != len(images) + 1:
            raise ValueError(f"{len(pieces)} text pieces cannot surround {len(images)} images")
        ids = self.text(pieces[0])
        for image, piece in zip(images, pieces[1:]):
            ids += self.image(image) + self.text(piece)
        return ids

    def observation(
        self, text: str | Sequence[str], images: Sequence[Path], model_closed_turn: bool, end: str = ""
    ) -> list[int]:
        """A tool result as a user turn after a model turn, ending where the next model turn begins.

        `text` is the body, or the pieces of text around `images` (see `pieces`). A turn cut at
        a stop string (</code>, </tool_call>) was not closed by the model, so the observation
        closes it with <|im_end|>; those tokens are ours, not the model's (mask 0). `end` follows
        the assistant header: the released environment writes "<think>" there for the model.
        """
        close = ([] if model_closed_turn else [self.im_end]) + self.newline
        body = self.content(text, images) if isinstance(text, str) else self.pieces(text, images)
        turn_end = [self.im_end] + self.newline + self.header("assistant") + self.text(end)
        return close + self.header("user") + body + turn_end

    def conversation(self, messages: Sequence[Message], images: Sequence[Path]) -> tuple[list[int], list[int]]:
        """Token ids and loss mask of a whole conversation: 1 on assistant content and its <|im_end|>."""
        ids: list[int] = []
        mask: list[int] = []
        remaining = list(images)
        for message in messages:
            n_images = message.content.count(IMAGE_PLACEHOLDER)
            used, remaining = remaining[:n_images], remaining[n_images:]
            body = self.content(message.content, used)
            head = self.header(message.role)
            trained = 1 if message.role == "assistant" else 0
            ids += head + body + [self.im_end] + self.newline
            mask += [0] * len(head) + [trained] * (len(body) + 1) + [0] * len(self.newline)
        if remaining:
            raise ValueError(f"{len(remaining)} images left over after the last <image> placeholder")
        return ids, mask
