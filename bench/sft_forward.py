"""The training forward (`deepeyes.train.forward.token_logprobs`) against two baselines, same
model, same batch, same run:

- its LM head only at each sequence's trained positions vs over every position from the batch's
  first trained token (the usual `logits_to_keep` slice);
- its body under plain causal attention (rows are right-padded) vs under the padding mask.

    python bench/sft_forward.py          # last line: RESULT {json}
    python bench/sft_forward.py --smoke  # 2 sequences, 1 timed repeat: checks the script runs
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from deepeyes.agent.chat import ChatEncoder
from deepeyes.config import DataConfig, ModelConfig
from deepeyes.data import read_sft_records
from deepeyes.model import model_inputs, rope_position_ids
from deepeyes.train.forward import sequence_inputs, token_logprobs
from deepeyes.train.setup import data_paths, load_policy
from deepeyes.train.sft import encode_sft_dataset

MICRO_BATCH = 4
REPEATS = 5


def sliced_head_logprobs(model, pixels, sequences, pad_id):
    """Baseline: the LM head over every position from the earliest trained one to the end."""
    length = max(len(s.ids) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, s in enumerate(sequences):
        input_ids[row, : len(s.ids)] = torch.tensor(s.ids)
        attention_mask[row, : len(s.ids)] = 1
    pixel_values, grid_thw = pixels.batch([image for s in sequences for image in s.images])
    inputs = model_inputs(input_ids, attention_mask, pixel_values, grid_thw)
    first = min(s.mask.index(1) for s in sequences) - 1
    logits = model(**inputs, position_ids=rope_position_ids(model, inputs), logits_to_keep=length - first).logits
    logprobs = -F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, first + 1 :].flatten(), reduction="none")
    mask = torch.tensor([s.mask[first + 1 :] + [0] * (length - len(s.ids)) for s in sequences]).flatten()
    return logprobs[mask.bool()]


def masked_body_logprobs(model, pixels, sequences, pad_id):
    """Baseline: the same gathered head, with the body's attention under the padding mask."""
    inputs = sequence_inputs(pixels, sequences, pad_id)
    hidden = model.model(**inputs, position_ids=rope_position_ids(model, inputs)).last_hidden_state
    rows, positions = zip(*[(row, t - 1) for row, s in enumerate(sequences) for t, m in enumerate(s.mask) if m])
    targets = inputs["input_ids"][torch.tensor(rows), torch.tensor(positions) + 1]
    return -F.cross_entropy(model.lm_head(hidden[torch.tensor(rows), torch.tensor(positions)]), targets, reduction="none")


def timed(step, repeats: int) -> tuple[float, float, float]:
    """Median wall, user and system seconds of one forward + backward."""
    walls, users, systems = [], [], []
    for _ in range(repeats):
        before, started = os.times(), time.perf_counter()
        step()
        after = os.times()
        walls.append(time.perf_counter() - started)
        users.append(after.user - before.user)
        systems.append(after.system - before.system)
    return statistics.median(walls), statistics.median(users), statistics.median(systems)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2 sequences, 1 timed repeat")
    args = parser.parse_args()
    micro_batch, repeats = (2, 1) if args.smoke else (MICRO_BATCH, REPEATS)
    policy = load_policy(ModelConfig())
    records = read_sft_records(data_paths(DataConfig()).sft)
    samples, _ = encode_sft_dataset(records, ChatEncoder(policy.tokenizer, policy.pixels.tokens), 4096)
    # Lengths spread over the data's range: rows padded as a shuffled training batch's are.
    batch = sorted(samples, key=lambda s: len(s.ids))[:: len(samples) // micro_batch][:micro_batch]
    model, pad = policy.model.train(), policy.tokenizer.pad_token_id

    def gathered():
        model.zero_grad()
        torch.cat(token_logprobs(model, policy.pixels, batch, pad)).sum().backward()

    def sliced():
        model.zero_grad()
        sliced_head_logprobs(model, policy.pixels, batch, pad).sum().backward()

    def masked():
        model.zero_grad()
        masked_body_logprobs(model, policy.pixels, batch, pad).sum().backward()

    model.zero_grad()
    ours = torch.cat(token_logprobs(model, policy.pixels, batch, pad))
    same = all(torch.allclose(ours, baseline(model, policy.pixels, batch, pad), atol=1e-4)
               for baseline in (sliced_head_logprobs, masked_body_logprobs))
    gathered(), sliced(), masked()  # warm-up
    g_wall, g_user, g_sys = timed(gathered, repeats)
    s_wall, s_user, s_sys = timed(sliced, repeats)
    m_wall, _, _ = timed(masked, repeats)
    print(f"ours: {g_wall:.3f} s (user {g_user:.2f}, sys {g_sys:.2f}); "
          f"sliced head: {s_wall:.3f} s (user {s_user:.2f}, sys {s_sys:.2f}); masked body: {m_wall:.3f} s")
    print("RESULT " + json.dumps({
        "micro_batch": micro_batch, "trained_tokens": sum(sum(s.mask) for s in batch),
        "sequence_tokens": sum(len(s.ids) for s in batch), "same_logprobs": same,
        "gathered_s": round(g_wall, 4), "sliced_s": round(s_wall, 4), "speedup": round(s_wall / g_wall, 3),
        "masked_body_s": round(m_wall, 4), "speedup_vs_masked_body": round(m_wall / g_wall, 3),
        "sys_s_ratio": round(s_sys / max(g_sys, 1e-6), 3),
    }))


if __name__ == "__main__":
    main()
