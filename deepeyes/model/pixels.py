"""Image → vision-tower input, computed once per image and shared by everything that needs it.

The chat encoder needs each image's token count, the rollout engine and the trainer need its
pixel patches; all three ask this cache, so an image is decoded and preprocessed once per
process however many rollouts, turns and micro-batches refer to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image


@dataclass(frozen=True)
class ImagePixels:
    pixel_values: torch.Tensor  # (patches, channels * temporal * patch * patch)
    grid_thw: torch.Tensor  # (3,) temporal, height, width in patches
    tokens: int  # placeholder tokens this image occupies in the language model's input


class PixelCache:
    def __init__(self, image_processor, min_pixels: int, max_pixels: int, max_items: int = 4096):
        self._processor = image_processor
        self._size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        self._merge = int(image_processor.merge_size)
        self._items: dict[Path, ImagePixels] = {}
        self._max_items = max_items

    def get(self, path: Path) -> ImagePixels:
        path = Path(path)
        item = self._items.get(path)
        if item is None:
            if len(self._items) >= self._max_items:
                self._items.pop(next(iter(self._items)))  # oldest first: dicts keep insertion order
            with Image.open(path) as image:
                rgb = image.convert("RGB")
            out = self._processor(images=[rgb], size=self._size, return_tensors="pt")
            grid = out["image_grid_thw"][0]
            item = ImagePixels(out["pixel_values"], grid, int(grid.prod()) // self._merge**2)
            self._items[path] = item
        return item

    def tokens(self, path: Path) -> int:
        return self.get(path).tokens

    def batch(self, paths: Sequence[Path]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """pixel_values and image_grid_thw for these images, in order (None when there are none)."""
        if not paths:
            return None, None
        items = [self.get(path) for path in paths]
        return torch.cat([i.pixel_values for i in items]), torch.stack([i.grid_thw for i in items])

    def release(self) -> None:
        """Drop everything (called between steps so pixels do not accumulate)."""
        self._items.clear()
