"""Padding-free micro-batches: several multi-turn sequences packed into one row.

No token is spent on padding: each sequence attends only to itself (causal attention inside
each sequence, which the row's cumulative sequence lengths delimit) and its mrope positions
restart at 0, so a packed row computes exactly what the sequences would compute one by one.
"""

from __future__ import annotations

from typing import Sequence

import torch

from deepeyes.model.megatron.model import PackedBatch, mrope_positions
from deepeyes.model.pixels import PixelCache
from deepeyes.train.forward import TokenSequence


def pack(sequences: Sequence[TokenSequence], pixels: PixelCache, hf_config, pad_to: int = 1) -> PackedBatch:
    """One packed row of `sequences`; its logprobs come back in sequence order, masked positions only.

    `pad_to`: the row length is rounded up to a multiple (sequence parallelism splits the row
    over tensor-parallel ranks); padding tokens attend to nothing but themselves and are never scored.
    """
    ids, positions, logit_positions, targets, images = [], [], [], [], []
    starts = []
    offset = 0
    for sequence in sequences:
        if len(sequence.mask) != len(sequence.ids) or sequence.mask[:1] == [1]:
            raise ValueError("mask must align with ids and cannot select the first token (it has no context)")
        seq_ids = torch.tensor(sequence.ids, dtype=torch.long)
        _, grid = pixels.batch(list(sequence.images)) if sequence.images else (None, None)
        positions.append(mrope_positions(hf_config, seq_ids, grid))
        ids.append(seq_ids)
        starts.append(offset)
        for t, m in enumerate(sequence.mask):
            if m:
                logit_positions.append(offset + t - 1)
                targets.append(sequence.ids[t])
        images.extend(sequence.images)
        offset += len(sequence.ids)
    total = -(-offset // pad_to) * pad_to
    if total > offset:
        ids.append(torch.full((total - offset,), hf_config.text_config.pad_token_id or 0, dtype=torch.long))
        positions.append(torch.zeros(3, total - offset, dtype=torch.long))
    lengths = [len(s.ids) for s in sequences] + [1] * (total - offset)  # a padding token is a sequence of its own
    cu_seqlens = None  # one sequence, no padding: plain causal attention
    if len(lengths) > 1:
        cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    pixel_values, grid_thw = pixels.batch(images) if images else (None, None)
    return PackedBatch(
        input_ids=torch.cat(ids)[None],
        positions=torch.cat(positions, dim=1)[:, None],
        cu_seqlens=cu_seqlens,
        max_seqlen=max(lengths),
        logit_positions=torch.tensor(logit_positions, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        pixel_values=pixel_values,
        image_grid_thw=grid_thw,
    )


def split_by_sequence(values: torch.Tensor, sequences: Sequence[TokenSequence]) -> list[torch.Tensor]:
    """The packed batch's per-position values, back to one tensor per sequence."""
    return list(values.split([sum(s.mask) for s in sequences]))
