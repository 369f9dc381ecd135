"""Forward and generate through the loading path with 3-D mrope positions."""

import numpy as np
import pytest
import torch
from PIL import Image

from deepeyes.model import IMAGE_TOKEN_ID, model_inputs, rope_position_ids


def noise_image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(processor, questions, images, padding_side="left"):
    texts = [prompt(processor, q) for q in questions]
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side=padding_side)
    return model_inputs(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"])


def positions_seen_by_rope(model, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the position ids the rotary embedding was actually called with)."""
    seen = []
    hook = model.model.language_model.rotary_emb.register_forward_pre_hook(lambda _, args: seen.append(args[1]))
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        hook.remove()
    return logits, seen[0]


@pytest.fixture(scope="module")
def single(processor):
    return encode(processor, ["What is in the image?"], [noise_image(224, 168, seed=0)])


def test_forward_with_image_uses_3d_positions(tiny_model, single):
    logits, positions = positions_seen_by_rope(tiny_model, **single)
    assert logits.shape == (*single["input_ids"].shape, 152064)
    assert torch.isfinite(logits).all()

    assert torch.equal(positions, rope_position_ids(tiny_model, single))
    image = single["input_ids"][0] == IMAGE_TOKEN_ID
    t, h, w = positions[:, 0, image]
    grid_h, grid_w = (single["image_grid_thw"][0, 1:] // 2).tolist()  # 8 x 6 merged tokens
    assert (t == t[0]).all()
    assert torch.equal(h - h[0], torch.arange(grid_h).repeat_interleave(grid_w))
    assert torch.equal(w - w[0], torch.arange(grid_w).repeat(grid_h))
    # text after the image continues from the image's largest side, not from its token count
    first_image = int(image.nonzero()[0])
    after = int(image.nonzero()[-1]) + 1
    assert positions[0, 0, after] == first_image + max(grid_h, grid_w)

    # Without mm_token_type_ids transformers 5.23 silently falls back to 1-D positions.
    plain = {k: v for k, v in single.items() if k != "mm_token_type_ids"}
    plain_logits, plain_positions = positions_seen_by_rope(tiny_model, **plain)
    assert torch.equal(plain_positions[0, 0], torch.arange(single["input_ids"].shape[1]))
    assert not torch.allclose(plain_logits, logits)


def test_explicit_positions_give_the_same_forward(tiny_model, processor):
    batch = encode(processor, ["A?", "A longer question?"], [noise_image(224, 224, 1), noise_image(60, 90, 2)])
    with torch.no_grad():
        implicit = tiny_model(**batch).logits
        explicit = tiny_model(**batch, position_ids=rope_position_ids(tiny_model, batch)).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(explicit[mask], implicit[mask])


def test_text_only_left_padded_rows_start_at_zero(tiny_model, processor):
    batch = processor.tokenizer(["hi", "a longer line of text"], return_tensors="pt", padding=True, padding_side="left")
    inputs = model_inputs(batch["input_ids"], batch["attention_mask"])
    positions = rope_position_ids(tiny_model, inputs)
    for row in range(2):
        real = batch["attention_mask"][row].bool()
        assert torch.equal(positions[:, row, real], torch.arange(int(real.sum())).expand(3, -1))


def test_model_inputs_rejects_placeholder_grid_mismatch(single):
    truncated = single["input_ids"][:, :40], single["attention_mask"][:, :40]
    with pytest.raises(ValueError, match="needs 48"):
        model_inputs(*truncated, single["pixel_values"], single["image_grid_thw"])
    with pytest.raises(ValueError, match="needs 0"):
        model_inputs(single["input_ids"], single["attention_mask"])


def test_left_padded_batched_generate_matches_single(tiny_model, processor):
    questions = ["What is in the image?", "Describe it."]
    images = [noise_image(224, 224, 3), noise_image(100, 120, 4)]
    batch = encode(processor, questions, images)
    assert (batch["attention_mask"] == 0).any()  # the rows really are padded
    with torch.no_grad():
        together = tiny_model.generate(**batch, max_new_tokens=8, do_sample=False)[:, -8:]
        for row, (question, image) in enumerate(zip(questions, images)):
            alone = tiny_model.generate(**encode(processor, [question], [image]), max_new_tokens=8, do_sample=False)
            assert torch.equal(together[row], alone[0, -8:])


def test_generate_stops_at_stop_string(tiny_model, processor, single):
    with torch.no_grad():
        free = tiny_model.generate(**single, max_new_tokens=12, do_sample=False)[0, single["input_ids"].shape[1] :]
    tokenizer = processor.tokenizer
    stop = tokenizer.decode(free[4:6])
    assert stop.strip() and stop not in tokenizer.decode(free[:4])
    with torch.no_grad():
        stopped = tiny_model.generate(
            **single, max_new_tokens=12, do_sample=False, stop_strings=[stop], tokenizer=tokenizer
        )[0, single["input_ids"].shape[1] :]
    assert torch.equal(stopped, free[:6])
    assert tokenizer.decode(stopped).endswith(stop)


def test_cached_decoding_matches_full_forwards(tiny_model, single):
    """Decode steps continue the 3-D positions correctly: greedy `generate` (KV cache, cached rope
    deltas) picks the same tokens as full forwards over the growing sequence."""
    with torch.no_grad():
        generated = tiny_model.generate(**single, max_new_tokens=6, do_sample=False)[0, single["input_ids"].shape[1] :]
        ids, mask = single["input_ids"], single["attention_mask"]
        for token in generated:
            inputs = model_inputs(ids, mask, single["pixel_values"], single["image_grid_thw"])
            next_token = tiny_model(**inputs, use_cache=False).logits[0, -1].argmax()
            assert next_token == token
            ids = torch.cat([ids, next_token.view(1, 1)], dim=1)
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
