"""Packed rows: a lone sequence runs plain causal attention (the flash kernel on GPU); several
sequences, or padding, are delimited by cumulative lengths: flash attention per sequence on GPU,
the block-diagonal mask on the CPU. The CUDA tests run on a GPU machine (bench/mfu.py's)."""

from types import SimpleNamespace

import pytest
import torch

from deepeyes.model.megatron.model import block_causal_mask
from deepeyes.model.megatron.spec import SDPAttention
from deepeyes.model.tiny import tiny_config
from deepeyes.train.forward import TokenSequence
from deepeyes.train.megatron.batch import pack


def sequence(length: int) -> TokenSequence:
    return TokenSequence(list(range(100, 100 + length)), [], [0] + [1] * (length - 1))


def test_one_sequence_is_plain_causal_several_or_padded_are_delimited():
    config = tiny_config()
    assert pack([sequence(5)], None, config).cu_seqlens is None
    padded = pack([sequence(5)], None, config, pad_to=8)
    assert padded.cu_seqlens.tolist() == [0, 5, 6, 7, 8] and padded.max_seqlen == 5  # padding: itself only
    allowed = ~block_causal_mask(padded.cu_seqlens)[0, 0]  # True = may attend
    assert allowed[:5, :5].equal(torch.ones(5, 5, dtype=torch.bool).tril())
    assert not allowed[5:, :5].any() and allowed[5:, 5:].equal(torch.eye(3, dtype=torch.bool))
    two = pack([sequence(3), sequence(2)], None, config)
    assert two.cu_seqlens.dtype == torch.int32 and two.cu_seqlens.tolist() == [0, 3, 5] and two.max_seqlen == 3
    allowed = ~block_causal_mask(two.cu_seqlens)[0, 0]
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen flash attention runs on CUDA only")
def test_packed_flash_attention_equals_each_sequence_alone():
    from megatron.core.packed_seq_params import PackedSeqParams

    attention = SDPAttention(SimpleNamespace(kv_channels=128), 1, None, "self")
    lengths = [300, 1, 517, 64]
    cu = torch.tensor([0, 300, 301, 818, 882], dtype=torch.int32, device="cuda")
    query = torch.randn(sum(lengths), 1, 28, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    key, value = (torch.randn(sum(lengths), 1, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                  for _ in range(2))
    packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=517, max_seqlen_kv=517)
    together = attention(query, key, value, None, packed_seq_params=packed)
    alone = torch.cat([attention(q, k, v, None) for q, k, v in
                       zip(*(t.split(lengths) for t in (query, key, value)))])
    # Two bf16 kernels (SDPA may pick cuDNN's) round differently; a sequence seeing another's
    # keys would be off by the size of the values themselves.
    grad = torch.randn_like(together)
    pairs = [(together, alone)] + [(torch.autograd.grad(together, x, grad, retain_graph=True)[0],
                                    torch.autograd.grad(alone, x, grad, retain_graph=True)[0]) for x in (query, key, value)]
    for packed_value, alone_value in pairs:
        assert (packed_value - alone_value).abs().max() <= 1e-2 * alone_value.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled log-probabilities run on CUDA only")
def test_compiled_target_logprobs_equal_eager():
    from deepeyes.model.megatron.model import compiled_target_logprobs, target_logprobs

    logits = torch.randn(1000, 152064, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 152064, (1000,), device="cuda")
    grad = torch.randn(1000, device="cuda")
    eager, compiled = target_logprobs(logits, targets), compiled_target_logprobs(logits, targets)
    assert compiled.dtype == torch.float32
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-4)  # fp32 sums over 152k terms, in another order
    torch.testing.assert_close(torch.autograd.grad(compiled, logits, grad)[0], torch.autograd.grad(eager, logits, grad)[0])
