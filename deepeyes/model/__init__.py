"""Qwen2.5-VL for deepeyes: the real tokenizer built offline, an image-only processor, a tiny
offline model for tests and CPU runs, and the loading code real checkpoints share."""

from deepeyes.model.load import (
    IMAGE_TOKEN_ID,
    image_token_count,
    load_model,
    load_processor,
    model_inputs,
    rope_position_ids,
)
from deepeyes.model.pixels import PixelCache
from deepeyes.model.processor import Qwen2_5_VLImageOnlyProcessor
from deepeyes.model.tiny import ensure_tiny_model
from deepeyes.model.tokenizer import build_qwen2_5_tokenizer

__all__ = [
    "IMAGE_TOKEN_ID",
    "PixelCache",
    "Qwen2_5_VLImageOnlyProcessor",
    "build_qwen2_5_tokenizer",
    "ensure_tiny_model",
    "image_token_count",
    "load_model",
    "load_processor",
    "model_inputs",
    "rope_position_ids",
]
