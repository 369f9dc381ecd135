"""The conversion's tensor layouts, without processes: slicing for TP ranks and gathering back is exact."""

import pytest
import torch
from types import SimpleNamespace

from deepeyes.model.megatron.convert import _read_shard, _unshard

# Qwen2.5-VL-7B's attention shape, smaller hidden size: 28 query heads in 4 key/value groups.
TEXT = SimpleNamespace(hidden_size=28 * 8, num_attention_heads=28, num_key_value_heads=4)
COLUMNS_SPLIT = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
REPLICATED = ("input_layernorm.weight",)


def shard(kind, hf, rank, size):
    """`rank`'s slice, as the megatron parameter of a TP=`size` model asks for it (by its shape)."""
    full = torch.Size([sum(t.shape[0] for t in hf), *hf[0].shape[1:]])
    if kind in COLUMNS_SPLIT:
        shape = torch.Size([full[0], full[1] // size])
    elif kind in REPLICATED:
        shape = full
    else:
        shape = torch.Size([full[0] // size, *full[1:]])
    return _read_shard(kind, hf, shape, TEXT, rank)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize(
    "kind, shapes",
    [
        ("self_attention.linear_qkv.weight", [(224, 224), (32, 224), (32, 224)]),
        ("self_attention.linear_qkv.bias", [(224,), (32,), (32,)]),
        ("mlp.linear_fc1.weight", [(96, 224), (96, 224)]),
        ("mlp.linear_fc2.weight", [(224, 96)]),
        ("self_attention.linear_proj.weight", [(224, 224)]),
        ("embedding.word_embeddings.weight", [(64, 224)]),
        ("input_layernorm.weight", [(224,)]),
    ],
)
def test_slices_for_every_rank_gather_back_bit_exactly(kind, shapes, tp):
    hf = [torch.randn(shape) for shape in shapes]
    shards = [shard(kind, hf, rank, tp) for rank in range(tp)]
    assert all(torch.equal(a, b) for a, b in zip(_unshard(kind, shards, TEXT), hf))


def test_qkv_slices_hold_whole_groups_query_heads_then_key_then_value():
    head = 8
    q = torch.arange(28 * head).float()  # biases: one value per output channel
    k = 1000 + torch.arange(4 * head).float()
    v = 2000 + torch.arange(4 * head).float()
    rank1 = shard("self_attention.linear_qkv.bias", [q, k, v], rank=1, size=2)  # groups 2 and 3
    group2 = torch.cat([q[14 * head : 21 * head], k[2 * head : 3 * head], v[2 * head : 3 * head]])
    assert torch.equal(rank1[: len(group2)], group2)


def test_fc1_slice_is_gate_then_up():
    gate, up = torch.randn(96, 8), torch.randn(96, 8)
    rank0 = shard("mlp.linear_fc1.weight", [gate, up], rank=0, size=2)
    assert torch.equal(rank0, torch.cat([gate[:48], up[:48]]))
