"""Loading a Qwen2.5-VL checkpoint and preparing its inputs.

The same code loads the tiny offline model and a released checkpoint such as
Qwen2.5-VL-7B-Instruct: plain `from_pretrained(path)`.

Positions: Qwen2.5-VL rotates queries and keys by 3-D (temporal, height, width) positions —
image tokens get their grid coordinates, text continues after the image's largest extent. In
transformers 5.23 the model derives them (`Qwen2_5_VLModel.get_rope_index`) only when it is
given `mm_token_type_ids` (0 text, 1 image, 2 video) along with `image_grid_thw`; without them
it silently uses 1-D positions. `model_inputs` always supplies them.
"""

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from deepeyes.model.processor import Qwen2_5_VLImageOnlyProcessor

IMAGE_TOKEN_ID = 151655  # <|image_pad|>
MERGE_SIZE = 2  # Qwen2.5-VL merges 2x2 vision patches into one language-model token


def load_model(path: str | Path, dtype: torch.dtype = torch.float32,
               weights: bool = True) -> Qwen2_5_VLForConditionalGeneration:
    """The model at `path`, in eval mode as `from_pretrained` leaves it (training calls `.train()`).

    `weights=False`: its config and structure on the meta device, no weights and no memory — for
    a megatron rank, which reads only its own slices of the checkpoint (`CheckpointTensors`).
    """
    if weights:
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), dtype=dtype)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig.from_pretrained(str(path)), dtype=dtype)
    return model.eval()


class CheckpointTensors(Mapping):
    """The tensors of an HF checkpoint directory under the model's own parameter names, read lazily.

    `tensors[name]` is a safetensors slice: `tensors[name][rows]` or `[:, cols]` reads only those
    bytes from disk, `[:]` the whole tensor. A megatron rank thus holds its own share of the
    weights, not a copy of the whole model. Released Qwen2.5-VL checkpoints store the legacy names
    (`model.layers.*`, `visual.*`) that transformers renames on load (`model.language_model.*`,
    `model.visual.*`); both layouts are read.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{path} has no model.safetensors or model.safetensors.index.json")
        self._where: dict[str, tuple] = {}  # model name -> (open file, name in the file)
        for file in files:
            handle = safe_open(str(path / file), framework="pt")
            for stored in handle.keys():
                self._where[_model_name(stored)] = (handle, stored)

    def __getitem__(self, name: str):
        handle, stored = self._where[name]
        return handle.get_slice(stored)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        """Drop the open files (and their memory maps)."""
        self._where.clear()


def _model_name(stored: str) -> str:
    """The parameter name transformers gives a stored tensor (its conversion mapping for
    Qwen2_5_VLForConditionalGeneration): visual.* -> model.visual.*, model.* -> model.language_model.*."""
    if stored.startswith("visual."):
        return "model." + stored
    if stored.startswith("model.") and not stored.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + stored.removeprefix("model.")
    return stored


def load_processor(path: str | Path) -> Qwen2_5_VLImageOnlyProcessor:
    """The tokenizer + image processor at `path` (`processor.tokenizer` is the tokenizer)."""
    return Qwen2_5_VLImageOnlyProcessor.from_pretrained(str(path))


def image_token_count(grid_thw: torch.Tensor | tuple[int, int, int], merge_size: int = MERGE_SIZE) -> int:
    """Number of `<|image_pad|>` tokens one image occupies, from its `image_grid_thw` row."""
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // (merge_size * merge_size)


def model_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    image_token_id: int = IMAGE_TOKEN_ID,
    merge_size: int = MERGE_SIZE,
) -> dict[str, torch.Tensor]:
    """Keyword arguments for `model(...)` and `model.generate(...)` with 3-D mrope positions.

    `input_ids` must already hold each image's `<|image_pad|>` run (the processor expands them);
    images are matched to runs in order, across the batch row by row, as the model does.
    Raises ValueError when the placeholder count disagrees with the image grids.
    """
    image_tokens = input_ids == image_token_id
    expected = 0 if image_grid_thw is None else sum(image_token_count(row, merge_size) for row in image_grid_thw)
    if int(image_tokens.sum()) != expected:
        raise ValueError(
            f"input_ids hold {int(image_tokens.sum())} <|image_pad|> tokens but image_grid_thw "
            f"({None if image_grid_thw is None else image_grid_thw.tolist()}) needs {expected}: "
            "expand the placeholders with the processor that produced pixel_values"
        )
    if (pixel_values is None) != (image_grid_thw is None):
        raise ValueError("pixel_values and image_grid_thw must be given together")
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": image_tokens.to(torch.int32),
    }
    if pixel_values is not None:
        inputs["pixel_values"] = pixel_values
        inputs["image_grid_thw"] = image_grid_thw
    return inputs


def rope_position_ids(model: Qwen2_5_VLForConditionalGeneration, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The (3, batch, seq) mrope positions the model uses for `inputs` (from `model_inputs`).

    Passing them as `position_ids=` makes a forward independent of the rope state the model
    caches between `generate` calls, and gives text-only, left-padded rows correct positions
    (the model's own fallback ignores the padding). Padding positions are 0.
    """
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        attention_mask=inputs["attention_mask"],
    )
    return positions
