"""An image-only Qwen2.5-VL processor that needs no torchvision.

transformers 5.x builds the stock `Qwen2_5_VLProcessor` with a video processor that requires
torchvision, which we never install (the PyPI wheel is a CUDA build that breaks transformers on
CPU boxes). This subclass drops the video processor and pairs the tokenizer with the PIL/numpy
image processor, `Qwen2VLImageProcessorPil`. Everything else — `<|image_pad|>` expansion to
`grid_t * grid_h * grid_w / merge_size**2` tokens, `mm_token_type_ids`, chat template,
`save_pretrained` / `from_pretrained` — is the stock processor's code.
"""

from transformers import AutoImageProcessor, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil


class QwenVLImageProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for text and images (no video)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a directory written by `save_pretrained` or from a released Qwen2.5-VL checkpoint.

        The image processor is forced to the PIL backend: a released checkpoint's config names the
        torchvision one.
        """
        kwargs.setdefault("backend", "pil")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


def build_image_processor(min_pixels: int, max_pixels: int) -> Qwen2VLImageProcessorPil:
    """Qwen2.5-VL's image processor (patch 14, merge 2, CLIP mean/std) with the given pixel budget.

    Images are resized so that their area lies in [min_pixels, max_pixels] with both sides a
    multiple of 28; each 28x28 block becomes one language-model token.
    """
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
