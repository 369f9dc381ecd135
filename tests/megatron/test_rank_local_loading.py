"""Rank-local loading: each rank reads only its slices of the safetensors files, and gets exactly
the parameters the whole-state-dict load gives it, at TP and PP mixes on 4 ranks (GQA, a sharded
checkpoint). Its host memory is measured by bench/host_memory.py --loading."""

import json

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from deepeyes.model import ensure_tiny_model, load_processor
from deepeyes.model.megatron.spec import ParallelLayout as Layout
from deepeyes.model.tiny import tiny_config
from tests.megatron.workers import rank_local_loading

pytestmark = pytest.mark.slow


def gqa_model_in_shards(path):
    """The tiny model with 4 layers and 8 query heads in 4 key/value groups (so TP 4 splits whole
    groups), saved in several safetensors files with an index, as released checkpoints are."""
    config = tiny_config()
    text = config.text_config
    text.num_hidden_layers, text.layer_types = 4, ["full_attention"] * 4
    text.num_attention_heads, text.num_key_value_heads = 8, 4
    text.rope_parameters["mrope_section"] = [1, 1, 2]  # head_dim 8: 4 rotary frequencies
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path, max_shard_size="20MB")
    load_processor(ensure_tiny_model()).save_pretrained(path)
    return path


def test_rank_local_loading_gives_the_full_loads_parameters_on_4_ranks(tmp_path, run_ranks):
    model_dir = gqa_model_in_shards(tmp_path / "model")
    assert len(set(json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    layouts = [Layout(tensor=4), Layout(tensor=2, pipeline=2), Layout(pipeline=4),
               Layout(pipeline=2, virtual_pipeline=2)]
    report = run_ranks(rank_local_loading, 4, layouts, str(model_dir))
    for layout, ranks in zip(layouts, report):
        for rank, result in enumerate(ranks):
            assert result["compared"] > 0, (layout, rank)
            assert result["differ"] == [] and result["requires_grad_differ"] == [], (layout, rank, result)
        assert any(result["vision"] for result in ranks), layout  # the first stage loaded the vision tower
