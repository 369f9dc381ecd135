"""The image-only processor: placeholder expansion, pixel budget, save/load without torchvision."""

import numpy as np
import pytest
import torch
from PIL import Image

from deepeyes.model import IMAGE_TOKEN_ID, Qwen2_5_VLImageOnlyProcessor, image_token_count

PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("height", "width", "grid"),
    [
        (224, 224, (1, 16, 16)),  # exactly the tiny model's budget: 64 tokens
        (28, 28, (1, 4, 4)),  # scaled up to min_pixels (56x56)
        (480, 640, (1, 12, 18)),  # scaled down to fit 224*224 pixels, aspect kept
        (100, 1000, (1, 4, 50)),  # very wide: 2x25 merged tokens
    ],
)
def test_image_pad_expands_to_grid(processor, height, width, grid):
    batch = processor(text=[PROMPT], images=[noise_image(height, width)], return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [list(grid)]
    t, h, w = grid
    assert batch["pixel_values"].shape == (t * h * w, 3 * 2 * 14 * 14)
    expected_tokens = t * h * w // 4
    assert image_token_count(batch["image_grid_thw"][0]) == expected_tokens
    assert int((batch["input_ids"] == IMAGE_TOKEN_ID).sum()) == expected_tokens
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == IMAGE_TOKEN_ID).to(torch.int64))


def test_several_images_in_one_prompt_expand_in_order(processor):
    text = "<|vision_start|><|image_pad|><|vision_end|> and <|vision_start|><|image_pad|><|vision_end|>"
    batch = processor(text=[text], images=[noise_image(224, 224), noise_image(56, 56, seed=1)], return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    runs = []
    for i, token in enumerate(ids):
        if token == IMAGE_TOKEN_ID:
            if i == 0 or ids[i - 1] != IMAGE_TOKEN_ID:
                runs.append(0)
            runs[-1] += 1
    assert runs == [image_token_count(row) for row in batch["image_grid_thw"]] == [64, 4]


def test_save_and_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    reloaded = Qwen2_5_VLImageOnlyProcessor.from_pretrained(tmp_path)
    assert type(reloaded.image_processor).__name__ == "Qwen2VLImageProcessorPil"  # torchvision is absent here
    assert reloaded.chat_template == processor.chat_template
    image = noise_image(300, 200)
    a = processor(text=[PROMPT], images=[image], return_tensors="pt")
    b = reloaded(text=[PROMPT], images=[image], return_tensors="pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_chat_template_places_vision_tokens(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + PROMPT
