"""An image-only Qwen2.5-VL processor that needs no torchvision.

transformers 5.x builds the stock `Qwen2_5_VLProcessor` with a video processor that requires
torchvision, which CPU boxes must not install (the PyPI wheel is a CUDA build that breaks
transformers). This subclass drops the video processor; everything else — `<|image_pad|>`
expansion to `grid_t * grid_h * grid_w / merge_size**2` tokens, `mm_token_type_ids`, the chat
template, `save_pretrained` / `from_pretrained` — is the stock processor's code.

It saves a complete Qwen2.5-VL processor directory: `processor_config.json` names the stock
`Qwen2_5_VLProcessor` and holds a video processor entry, so that vLLM and `AutoProcessor` load
every checkpoint we write where torchvision is installed (vLLM refuses a directory without a video
processor config). This class loads such a directory, and a released checkpoint, ignoring video.

On load, `AutoImageProcessor` picks the image processor backend: the PIL/numpy
`Qwen2VLImageProcessorPil` where torchvision is absent, the torchvision one where it is
installed (GPU clusters). Both resize to the same grid, so token counts agree; pixel values
differ slightly between the two.
"""

from typing import Any

from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for text and images (no video); load with `from_pretrained(path)`."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The saved config, as the stock processor writes it (see the module docstring)."""
        config = super().to_dict()
        config["processor_class"] = Qwen2_5_VLProcessor.__name__
        config["video_processor"] = video_processor_config(config["image_processor"])
        return config


def video_processor_config(image_processor: dict[str, Any]) -> dict[str, Any]:
    """Qwen2.5-VL's video processor config with the image processor's settings (patching, merge,
    normalization, pixel budget): what a released checkpoint's video processor reads from its
    `preprocessor_config.json`."""
    config = {key: value for key, value in image_processor.items() if key != "image_processor_type"}
    return {**config, "video_processor_type": "Qwen2VLVideoProcessor"}


def build_image_processor(min_pixels: int, max_pixels: int) -> Qwen2VLImageProcessorPil:
    """Qwen2.5-VL's image processor (patch 14, merge 2, CLIP mean/std) with the given pixel budget.

    Images are resized so that their area lies in [min_pixels, max_pixels] with both sides a
    multiple of 28; each 28x28 block becomes one language-model token.
    """
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
