"""Images → Qwen2.5-VL vision inputs, decoded where they are consumed, within a memory bound.

A prompt's image is fed to every rollout of its group and again to the training forward; tool
calls add images mid-trajectory. `PixelCache` keys processed images by content hash (the n
rollouts of a prompt, and identical crops, hit one entry), keeps at most `max_bytes` of
`pixel_values` (least recently used first out), and counts an image's placeholder tokens from
its header alone, so prompts can be tokenized without decoding pixels.
"""

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from deepeyes.data.image_store import content_key


class PixelCache:
    """Vision inputs for image files under one pixel budget; call `release()` between steps.

    An image that does not fit the byte bound is processed again when it comes back: memory
    stays bounded whatever the batch, at the cost of recomputing a resize and patchify.
    """

    def __init__(self, image_processor, min_pixels: int, max_pixels: int, max_bytes: int = 256 << 20):
        self._processor = image_processor
        self._size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        self._budget = {"min_pixels": min_pixels, "max_pixels": max_pixels}
        self._token_pixels = (image_processor.patch_size * image_processor.merge_size) ** 2
        self.max_bytes = max_bytes
        self.bytes = 0  # held now
        self.processed = 0  # images decoded and processed so far (cache misses)
        self._entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def tokens(self, image: str | Path) -> int:
        """Number of `<|image_pad|>` tokens the image occupies (reads only its header)."""
        with Image.open(image) as opened:
            width, height = opened.size
        patches = self._processor.get_number_of_image_patches(height, width, self._budget)
        return patches // self._processor.merge_size**2

    def pixels(self, image: str | Path) -> int:
        """Pixels the image has once resized into the budget (what a per-trajectory budget counts)."""
        return self.tokens(image) * self._token_pixels

    def batch(self, images: Sequence[str | Path]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(pixel_values, image_grid_thw) for these images in order, or (None, None) for none."""
        if not images:
            return None, None
        entries = [self._entry(Path(image)) for image in images]
        return torch.cat([pixels for pixels, _ in entries]), torch.stack([grid for _, grid in entries])

    def release(self) -> None:
        """Forget every processed image."""
        self._entries.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        key = content_key(path)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        with Image.open(path) as opened:
            rgb = opened.convert("RGB")
        out = self._processor(images=[rgb], size=self._size, return_tensors="pt")
        del rgb  # the decoded image is not kept: only its processed pixels, and only within the bound
        entry = (out["pixel_values"], out["image_grid_thw"][0])
        self.processed += 1
        self._entries[key] = entry
        self.bytes += entry[0].nbytes
        while self.bytes > self.max_bytes and len(self._entries) > 1:
            _, (evicted, _) = self._entries.popitem(last=False)
            self.bytes -= evicted.nbytes
        return entry
