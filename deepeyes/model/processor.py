"""An image-only Qwen2.5-VL processor that needs no torchvision.

transformers 5.x builds the stock `Qwen2_5_VLProcessor` with a video processor that requires
torchvision, which CPU boxes must not install (the PyPI wheel is a CUDA build that breaks
transformers). This subclass drops the video processor; everything else — `<|image_pad|>`
expansion to `grid_t * grid_h * grid_w / merge_size**2` tokens, `mm_token_type_ids`, the chat
template, `save_pretrained` / `from_pretrained` — is the stock processor's code.

On load, `AutoImageProcessor` picks the image processor backend: the PIL/numpy
`Qwen2VLImageProcessorPil` where torchvision is absent, the torchvision one where it is
installed (GPU clusters). Both resize to the same grid, so token counts agree; pixel values
differ slightly between the two.
"""

from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for text and images (no video); load with `from_pretrained(path)`."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


def build_image_processor(min_pixels: int, max_pixels: int) -> Qwen2VLImageProcessorPil:
    """Qwen2.5-VL's image processor (patch 14, merge 2, CLIP mean/std) with the given pixel budget.

    Images are resized so that their area lies in [min_pixels, max_pixels] with both sides a
    multiple of 28; each 28x28 block becomes one language-model token.
    """
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
