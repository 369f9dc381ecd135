"""The training forward: a padded batch gives each sequence the log-probabilities it has alone."""

import torch

from deepeyes.agent.chat import ChatEncoder
from deepeyes.config import ModelConfig
from deepeyes.data import read_sft_records
from deepeyes.train.forward import TokenSequence, token_logprobs
from deepeyes.train.setup import load_policy


def test_padding_does_not_change_any_sequence_logprobs(tiny_dir, sample_data):
    policy = load_policy(ModelConfig(), str(tiny_dir))
    encoder = ChatEncoder(policy.tokenizer, policy.pixels.tokens)
    # Different families: different lengths (so real padding) and images per sequence.
    records = {r.family: r for r in read_sft_records(sample_data.sft_train)}.values()
    sequences = []
    for record in records:
        ids, mask = encoder.conversation(record.messages, list(record.images))
        sequences.append(TokenSequence(ids, list(record.images), mask))
    assert len({len(s.ids) for s in sequences}) == len(sequences) > 1
    with torch.no_grad():
        together = token_logprobs(policy.model, policy.pixels, sequences, policy.tokenizer.pad_token_id)
        alone = [token_logprobs(policy.model, policy.pixels, [s], policy.tokenizer.pad_token_id)[0] for s in sequences]
    for sequence, batched, single in zip(sequences, together, alone):
        assert batched.shape == (sum(sequence.mask),)
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
