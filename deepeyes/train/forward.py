"""Per-token log-probabilities of whole sequences: the one forward both SFT and GRPO train with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from deepeyes.model import model_inputs, rope_position_ids
from deepeyes.model.pixels import PixelCache


@dataclass(frozen=True)
class TokenSequence:
    """Token ids with their images; `mask[t] = 1` where the logprob of `ids[t]` is wanted."""

    ids: list[int]
    images: list[Path]
    mask: list[int]
    source: str = ""  # the data-mixture source it came from (SFT), for the realized mix per step


def sequence_inputs(pixels: PixelCache, sequences: Sequence[TokenSequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded model inputs for these sequences; their images are decoded here, where they
    are consumed, through the (bounded) pixel cache."""
    length = max(len(s.ids) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(sequences):
        if len(sequence.mask) != len(sequence.ids) or sequence.mask[:1] == [1]:
            raise ValueError("mask must align with ids and cannot select the first token (it has no context)")
        input_ids[row, : len(sequence.ids)] = torch.tensor(sequence.ids)
        attention_mask[row, : len(sequence.ids)] = 1
    pixel_values, grid_thw = pixels.batch([image for s in sequences for image in s.images])
    return model_inputs(input_ids, attention_mask, pixel_values, grid_thw)


def token_logprobs(
    model, pixels: PixelCache, sequences: Sequence[TokenSequence], pad_id: int, temperature: float = 1.0
) -> list[torch.Tensor]:
    """For each sequence, log p(ids[t] | ids[:t]) at its masked positions, in order: one padded forward.

    The language-model head runs only on the hidden states of wanted positions: with a 150k
    vocabulary the logits, not the transformer, dominate time and memory, and prompts and tool
    observations are usually most of a sequence.
    """
    inputs = {key: value.to(model.device) for key, value in sequence_inputs(pixels, sequences, pad_id).items()}
    input_ids = inputs["input_ids"]
    position_ids = rope_position_ids(model, inputs)
    # Rows are right-padded, so causal attention alone keeps every wanted position off the padding;
    # without a mask the attention kernel skips the upper triangle. Identical values; 1.12x the
    # masked forward + backward on a padded micro-batch (bench/sft_forward.py, tiny model, CPU).
    hidden = model.model(**(inputs | {"attention_mask": None}), position_ids=position_ids).last_hidden_state
    # Position p's hidden state predicts token p + 1.
    rows, positions = zip(*[(row, t - 1) for row, s in enumerate(sequences) for t, m in enumerate(s.mask) if m])
    rows, positions = torch.tensor(rows), torch.tensor(positions)
    logits = model.lm_head(hidden[rows, positions]).float()
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = -F.cross_entropy(logits, input_ids[rows, positions + 1], reduction="none")
    return list(logprobs.split([sum(s.mask) for s in sequences]))
