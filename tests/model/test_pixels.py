"""PixelCache: placeholder counts from headers agree with processed grids; each file processed once."""

import os

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


def test_each_file_is_processed_once_until_released_or_rewritten(cache, tmp_path):
    path = write_image(tmp_path / "a.png", 100, 100)
    first, _ = cache.batch([path])
    stat = path.stat()
    path.write_bytes(b"x" * stat.st_size)  # unreadable now, but same size and mtime: never read again
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again, _ = cache.batch([path])
    assert len(cache) == 1 and torch.equal(again, first)

    write_image(path, 300, 200, seed=1)
    os.utime(path, ns=(0, 10**18))  # a rewrite within the same mtime tick must still be noticed
    rewritten, grid = cache.batch([path])
    assert grid.tolist() == [[1, 18, 12]] and len(cache) == 2

    cache.release()
    assert len(cache) == 0


def test_no_images_and_missing_files(cache, tmp_path):
    assert cache.batch([]) == (None, None)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        cache.batch([tmp_path / "missing.png"])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        cache.tokens(tmp_path / "missing.png")
