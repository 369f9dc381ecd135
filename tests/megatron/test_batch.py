"""Packed rows: a lone sequence runs plain causal attention (the flash kernel on GPU); several
sequences, or padding, get the block-diagonal mask."""

from types import SimpleNamespace

import torch

from deepeyes.model.megatron.spec import SDPAttention
from deepeyes.model.tiny import tiny_config
from deepeyes.train.forward import TokenSequence
from deepeyes.train.megatron.batch import pack


def sequence(length: int) -> TokenSequence:
    return TokenSequence(list(range(100, 100 + length)), [], [0] + [1] * (length - 1))


def test_one_sequence_is_plain_causal_several_or_padded_are_masked():
    config = tiny_config()
    assert pack([sequence(5)], None, config).attention_mask is None
    padded = ~pack([sequence(5)], None, config, pad_to=8).attention_mask[0, 0]  # True = may attend
    assert padded[:5, :5].equal(torch.ones(5, 5, dtype=torch.bool).tril())
    assert not padded[5:, :5].any() and padded[5:, 5:].equal(torch.eye(3, dtype=torch.bool))  # padding: itself only
    two = pack([sequence(3), sequence(2)], None, config).attention_mask[0, 0]
    allowed = ~two
    assert allowed[:3, :3].equal(torch.ones(3, 3, dtype=torch.bool).tril())
    assert allowed[3:, 3:].equal(torch.ones(2, 2, dtype=torch.bool).tril())
    assert not allowed[3:, :3].any() and not allowed[:3, 3:].any()


def test_causal_attention_without_a_mask_equals_the_explicit_causal_mask():
    attention = SDPAttention(SimpleNamespace(kv_channels=16), 1, None, "self")
    length = 7
    query = torch.randn(length, 1, 4, 16)
    key, value = torch.randn(length, 1, 2, 16), torch.randn(length, 1, 2, 16)  # grouped-query: 2 groups
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)[None, None]  # True = may not attend
    torch.testing.assert_close(attention(query, key, value, None), attention(query, key, value, causal))
