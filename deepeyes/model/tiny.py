"""A tiny, randomly initialised Qwen2.5-VL that tests and CPU runs use in place of the 7B.

It has Qwen2.5-VL-7B's architecture and interfaces — the real tokenizer and vocabulary size,
untied embeddings, GQA, mrope, a windowed + full-attention vision tower with 2x2 patch merging —
at a size that runs on one CPU thread. It is written to disk with `save_pretrained` so that every
consumer loads it with the same `from_pretrained(path)` code a released checkpoint goes through.
"""

import hashlib
import json
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from deepeyes.cache import build_once, cache_root
from deepeyes.model.processor import Qwen2_5_VLImageOnlyProcessor, build_image_processor
from deepeyes.model.tokenizer import CHAT_TEMPLATE, build_qwen2_5_tokenizer

SEED = 0
# A 224x224 image becomes 8x8 = 64 language-model tokens; larger images are scaled down to that.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 224 * 224


def tiny_config() -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B's config shrunk: same vocabulary, special-token ids, patching and rope layout."""
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=152064,  # as Qwen2.5-VL-7B/32B: 151,665 real tokens padded for efficiency
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            # head_dim 16: the (temporal, height, width) sections cover its 8 rotary frequencies.
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=151643,
            eos_token_id=151645,
            pad_token_id=151643,
            # 1/sqrt(hidden_size). The 7B's 0.02 suits its width of 3584; at width 64 it leaves
            # attention near a flat saddle: in the learning recipe, token accuracy on held-out
            # cold-start trajectories after 25 SFT steps was 0.25 with 0.02 and 0.97 with this.
            initializer_range=0.125,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            tokens_per_second=2,
            window_size=112,
            fullatt_block_indexes=[1],  # block 0 uses windowed attention, block 1 full, as in the 7B
        ),
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=False,
    )


def build_tiny_model() -> Qwen2_5_VLForConditionalGeneration:
    """The tiny model with weights drawn from a fixed seed: equal weights on every call."""
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config())
    model.generation_config = GenerationConfig(bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643)
    return model


def _build_hash() -> str:
    """Short hash of what the saved files depend on: the code that builds them and the config
    (whose dict records the transformers version), so any change to either gives a fresh build."""
    recipe = hashlib.sha256(json.dumps(tiny_config().to_dict(), sort_keys=True).encode())
    for source in ("tiny.py", "tokenizer.py", "processor.py"):
        recipe.update(Path(__file__).with_name(source).read_bytes())
    return recipe.hexdigest()[:12]


def ensure_tiny_model(cache_dir: Path | None = None) -> Path:
    """Path of the tiny model directory (model, tokenizer, processor), building it on first use.

    The directory is `<cache_dir>/qwen2_5_vl-tiny-<hash>` (default cache: `$DEEPEYES_CACHE/models`);
    a change to the recipe gives a new hash and so a fresh build, built atomically (`build_once`).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "models"
    return build_once(cache_dir / f"qwen2_5_vl-tiny-{_build_hash()}", _save_tiny_model)


def _save_tiny_model(directory: Path) -> None:
    build_tiny_model().save_pretrained(directory)
    processor = Qwen2_5_VLImageOnlyProcessor(
        image_processor=build_image_processor(MIN_PIXELS, MAX_PIXELS),
        tokenizer=build_qwen2_5_tokenizer(),
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(directory)
