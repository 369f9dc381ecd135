"""Images on disk → Qwen2.5-VL vision inputs, each image processed once.

A prompt's image is fed to every rollout of its group and again to the training forward; tool
calls add images mid-trajectory. `PixelCache` resizes and patchifies each file once and hands out
the cached `pixel_values` / `image_grid_thw`, and counts an image's placeholder tokens from its
header alone, so prompts can be tokenized without decoding pixels.
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image


class PixelCache:
    """Vision inputs for image files under one pixel budget; call `release()` between steps.

    Entries are keyed by resolved path, modification time and size, so a file rewritten in place
    (a reused scratch path) is processed again rather than served stale.
    """

    def __init__(self, image_processor, min_pixels: int, max_pixels: int):
        self._processor = image_processor
        self._size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        self._budget = {"min_pixels": min_pixels, "max_pixels": max_pixels}
        self._entries: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def tokens(self, image: str | Path) -> int:
        """Number of `<|image_pad|>` tokens the image occupies (reads only its header)."""
        with Image.open(image) as opened:
            width, height = opened.size
        patches = self._processor.get_number_of_image_patches(height, width, self._budget)
        return patches // self._processor.merge_size**2

    def batch(self, images: Sequence[str | Path]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(pixel_values, image_grid_thw) for these images in order, or (None, None) for none."""
        if not images:
            return None, None
        entries = [self._entry(Path(image)) for image in images]
        return torch.cat([pixels for pixels, _ in entries]), torch.stack([grid for _, grid in entries])

    def release(self) -> None:
        """Forget every processed image (their pixels can be hundreds of MB at 7B budgets)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        entry = self._entries.get(key)
        if entry is None:
            with Image.open(path) as opened:
                rgb = opened.convert("RGB")
            out = self._processor(images=[rgb], size=self._size, return_tensors="pt")
            entry = (out["pixel_values"], out["image_grid_thw"][0])
            self._entries[key] = entry
        return entry
