"""Converters from the formats DeepEyesV2 distributes to our record schema (`deepeyes.data.schema`).

- `convert_sharegpt`: cold-start SFT, LLaMA-Factory "sharegpt" JSON → SFTRecord JSON lines;
- `convert_verl_parquet`: RL, verl-style parquet (one or several files, concatenated) → Record JSON lines;
- `convert_image_search_cache`: the MMSearch-R1 image-search cache → our image-search index.

Every row is validated as the readers validate it; a bad row raises `RecordError` naming the source
file and row, or with `on_error="skip"` is logged and counted in the returned `Conversion`. Images
stay where they are (referenced by path) unless they arrive as bytes, which are written once into
a content-addressed store. Each output gets a manifest `<output>.sha256.json` mapping every image
path it references (relative to the output, as in the output) to the sha256 of its bytes.
"""

from deepeyes.data.converters.images import write_hash_manifest
from deepeyes.data.image_store import ImageStore
from deepeyes.data.converters.search_cache import convert_image_search_cache
from deepeyes.data.converters.sharegpt import convert_sharegpt
from deepeyes.data.converters.rows import Conversion
from deepeyes.data.converters.verl import convert_verl_parquet

__all__ = [
    "Conversion",
    "ImageStore",
    "convert_image_search_cache",
    "convert_sharegpt",
    "convert_verl_parquet",
    "write_hash_manifest",
]
