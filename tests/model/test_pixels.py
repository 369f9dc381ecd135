"""PixelCache: placeholder counts from headers agree with processed grids; each image processed once,
keyed by content, within a byte bound."""

import numpy as np
import pytest
import torch
from PIL import Image

from deepeyes.model import IMAGE_TOKEN_ID, image_token_count
from deepeyes.model.pixels import PixelCache


def write_image(path, height: int, width: int, seed: int = 0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def cache(processor):
    return PixelCache(processor.image_processor, min_pixels=56 * 56, max_pixels=224 * 224)


@pytest.mark.parametrize(("height", "width"), [(224, 224), (28, 28), (480, 640), (100, 1000), (333, 77)])
@pytest.mark.parametrize("max_pixels", [112 * 112, 224 * 224])
def test_tokens_agree_with_processed_grid(processor, tmp_path, height, width, max_pixels):
    cache = PixelCache(processor.image_processor, min_pixels=56 * 56, max_pixels=max_pixels)
    path = write_image(tmp_path / "image.png", height, width)
    pixel_values, grid = cache.batch([path])
    assert cache.tokens(path) == image_token_count(grid[0]) <= max_pixels // (28 * 28)
    assert pixel_values.shape[0] == int(grid[0].prod())


def test_batch_matches_the_processor_and_keeps_order(cache, processor, tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", 60 + 50 * i, 90, seed=i) for i in range(3)]
    order = [paths[2], paths[0], paths[2]]
    pixel_values, grid = cache.batch(order)
    text = ["<|image_pad|>" * 3]
    reference = processor(text=text, images=[Image.open(p) for p in order], return_tensors="pt")
    assert torch.equal(grid, reference["image_grid_thw"])
    assert torch.equal(pixel_values, reference["pixel_values"])
    assert int((reference["input_ids"] == IMAGE_TOKEN_ID).sum()) == sum(cache.tokens(p) for p in order)


def test_images_are_keyed_by_content_and_processed_once_until_released(cache, tmp_path):
    path = write_image(tmp_path / "a.png", 100, 100)
    copy = tmp_path / "elsewhere.png"
    copy.write_bytes(path.read_bytes())
    first, _ = cache.batch([path])
    again, _ = cache.batch([copy, path])  # the same bytes under another name: the same entry
    assert (len(cache), cache.processed) == (1, 1) and torch.equal(again[: len(first)], first)

    write_image(path, 300, 200, seed=1)  # rewritten in place: other bytes, processed again
    rewritten, grid = cache.batch([path])
    assert grid.tolist() == [[1, 18, 12]] and (len(cache), cache.processed) == (2, 2)

    cache.release()
    assert (len(cache), cache.bytes) == (0, 0)


def test_memory_stays_within_the_byte_bound_least_recently_used_out(processor, tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", 224, 224, seed=i) for i in range(4)]
    one = PixelCache(processor.image_processor, 3136, 50176).batch(paths[:1])[0].nbytes
    cache = PixelCache(processor.image_processor, 3136, 50176, max_bytes=2 * one)
    cache.batch(paths[:2])
    cache.batch(paths[:1])  # paths[0] is now the most recently used
    cache.batch(paths[2:3])  # evicts paths[1]
    assert cache.bytes == 2 * one and len(cache) == 2
    cache.batch(paths[:1])
    assert cache.processed == 3  # paths[0] was still held
    cache.batch(paths[1:2])
    assert cache.processed == 4 and cache.bytes <= 2 * one
    pixel_values, _ = cache.batch(paths)  # a batch larger than the bound still comes back whole
    assert pixel_values.shape[0] * pixel_values.shape[1] * 4 == 4 * one and cache.bytes <= 2 * one


def test_pixels_counts_the_resized_image(cache, tmp_path):
    path = write_image(tmp_path / "wide.png", 1536, 2048)
    _, grid = cache.batch([path])
    assert cache.pixels(path) == int(grid[0].prod()) * 14 * 14 <= 224 * 224


def test_no_images_and_missing_files(cache, tmp_path):
    assert cache.batch([]) == (None, None)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        cache.batch([tmp_path / "missing.png"])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        cache.tokens(tmp_path / "missing.png")
