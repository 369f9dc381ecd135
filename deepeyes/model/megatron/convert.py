"""Exact Hugging Face ⇄ Megatron weight conversion for the Qwen2.5-VL language model, any TP/PP.

Conversion only moves and concatenates tensors (no arithmetic), so HF → Megatron → HF is
bit-exact. The two layouts that differ from a plain split:

- `linear_qkv` holds, for each key/value group in order, that group's query heads, then its
  key head, then its value head (weights and biases alike); tensor parallelism splits whole
  groups. HF keeps q_proj, k_proj, v_proj apart.
- `linear_fc1` on each tensor-parallel rank is [that rank's slice of gate_proj; its slice of
  up_proj], so the full (gathered) tensor interleaves gate and up per rank.

Row-parallel weights (`linear_proj` = o_proj, `linear_fc2` = down_proj) split their input
dimension; embedding and output layer split the vocabulary. Norms are replicated. The vision
tower is the HF module itself and keeps its HF names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

LM = "model.language_model"
_LAYER_NAMES = {  # megatron name inside a layer → HF names inside a layer
    "self_attention.linear_qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attention.linear_qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
    "input_layernorm.weight": ("input_layernorm.weight",),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
}
_TOP_NAMES = {
    "embedding.word_embeddings.weight": f"{LM}.embed_tokens.weight",
    "decoder.final_layernorm.weight": f"{LM}.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def _hf_names(name: str, layer_offset: int) -> tuple[str, tuple[str, ...]]:
    """(kind, HF names) of a megatron language-model parameter; kind is the megatron suffix."""
    if name in _TOP_NAMES:
        return name, (_TOP_NAMES[name],)
    parts = name.split(".")  # decoder.layers.<local>.<suffix...>
    if parts[:2] != ["decoder", "layers"]:
        raise KeyError(f"no HF counterpart for megatron parameter {name!r}")
    index, suffix = int(parts[2]) + layer_offset, ".".join(parts[3:])
    if suffix not in _LAYER_NAMES:
        raise KeyError(f"no HF counterpart for megatron parameter {name!r}")
    return suffix, tuple(f"{LM}.layers.{index}.{hf}" for hf in _LAYER_NAMES[suffix])


def _layer_offset(chunk) -> int:
    layers = chunk.language.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def _qkv_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """[q heads of group 0; k0; v0; q heads of group 1; k1; v1; ...] (weights or biases)."""
    tail = q.shape[1:]
    per_group = [t.reshape(groups, -1, *tail) for t in (q, k, v)]
    return torch.cat(per_group, dim=1).reshape(-1, *tail)


def _read_shard(kind: str, hf: list, shape: torch.Size, text, rank: int) -> torch.Tensor:
    """This tensor-parallel rank's slice (of `shape`) of a megatron parameter, reading only the
    rows or columns of its HF tensors that the slice holds (`hf`: tensors or safetensors slices)."""
    if kind.startswith("self_attention.linear_qkv"):
        head_dim = text.hidden_size // text.num_attention_heads
        q_rows = text.num_attention_heads // text.num_key_value_heads * head_dim  # query rows per group
        groups = shape[0] // (q_rows + 2 * head_dim)  # this rank's whole key/value groups
        first = rank * groups
        q, k, v = hf
        return _qkv_groups(q[first * q_rows : (first + groups) * q_rows],
                           k[first * head_dim : (first + groups) * head_dim],
                           v[first * head_dim : (first + groups) * head_dim], groups)
    if kind == "mlp.linear_fc1.weight":
        rows = shape[0] // 2
        gate, up = hf
        return torch.cat([gate[rank * rows : (rank + 1) * rows], up[rank * rows : (rank + 1) * rows]])
    (tensor,) = hf
    if kind in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
        return tensor[:, rank * shape[1] : (rank + 1) * shape[1]]
    if kind in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return tensor[rank * shape[0] : (rank + 1) * shape[0]]
    return tensor[:]  # norms: replicated


def _unshard(kind: str, shards: list[torch.Tensor], text) -> list[torch.Tensor]:
    """The HF tensors of a megatron parameter, from its slices on every tensor-parallel rank."""
    if kind.startswith("self_attention.linear_qkv"):
        head_dim = text.hidden_size // text.num_attention_heads
        heads_per_group = text.num_attention_heads // text.num_key_value_heads
        full = torch.cat(shards)
        grouped = full.reshape(text.num_key_value_heads, (heads_per_group + 2) * head_dim, *full.shape[1:])
        q, k, v = grouped.split([heads_per_group * head_dim, head_dim, head_dim], dim=1)
        return [t.reshape(-1, *full.shape[1:]).clone() for t in (q, k, v)]
    if kind == "mlp.linear_fc1.weight":
        halves = [s.chunk(2) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    if kind in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
        return [torch.cat(shards, dim=1)]
    if kind in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return [torch.cat(shards)]
    return [shards[0]]


def load_hf_weights(chunks, hf_state: Mapping, hf_config: Qwen2_5_VLConfig) -> None:
    """Copy this rank's part of an HF Qwen2.5-VL checkpoint into its model chunks: its TP slice of
    its layers, and the vision tower on the first stage.

    `hf_state` maps HF parameter names to tensors (a state dict) or to lazy slices
    (deepeyes.model.load.CheckpointTensors); only the slices this rank holds are read from it.
    Every language-model parameter of the chunks must be found.
    """
    rank = parallel_state.get_tensor_model_parallel_rank()
    text = hf_config.text_config
    with torch.no_grad():
        for chunk in chunks:
            offset = _layer_offset(chunk)
            for name, param in chunk.language.named_parameters():
                kind, hf_names = _hf_names(name, offset)
                missing = [n for n in hf_names if n not in hf_state]
                if missing:
                    raise KeyError(f"HF checkpoint lacks {missing} (needed for megatron {name})")
                value = _read_shard(kind, [hf_state[n] for n in hf_names], param.shape, text, rank)
                if value.shape != param.shape:
                    raise ValueError(f"{name}: checkpoint gives {tuple(value.shape)}, model has {tuple(param.shape)}")
                param.copy_(value)
            if chunk.visual is not None:
                visual = {k.removeprefix("model.visual."): hf_state[k][:] for k in hf_state if k.startswith("model.visual.")}
                chunk.visual.load_state_dict(visual, strict=True)


def _identity(param: torch.Tensor) -> torch.Tensor:
    return param


def export_hf_state(chunks, hf_config: Qwen2_5_VLConfig, select=None) -> dict[str, torch.Tensor] | None:
    """The full HF state dict gathered from every rank: returned on global rank 0, None elsewhere.

    Every rank must call it (tensor slices are all-gathered, pipeline stages gathered).
    `select(param)` exports something else per parameter in the same layout (e.g. its
    `main_grad`); the vision tower then contributes only its trainable parameters.
    """
    select = select or _identity
    text = hf_config.text_config
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    local: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for chunk in chunks:
            offset = _layer_offset(chunk)
            for name, param in chunk.language.named_parameters():
                kind, hf_names = _hf_names(name, offset)
                shards = [torch.empty_like(select(param)) for _ in range(tp_size)]
                dist.all_gather(shards, select(param).detach().contiguous(), group=tp_group)
                local.update(zip(hf_names, (t.cpu() for t in _unshard(kind, shards, text))))
            if chunk.visual is not None:
                visual = chunk.visual.state_dict() if select is _identity else {
                    name: select(p) for name, p in chunk.visual.named_parameters() if p.requires_grad
                }
                # clone: a gradient is a view into DDP's whole buffer, which pickling would copy
                local.update({f"model.visual.{k}": v.detach().cpu().clone() for k, v in visual.items()})
    if parallel_state.get_tensor_model_parallel_rank() != 0 or parallel_state.get_data_parallel_rank() != 0:
        local = {}
    stages = [None] * dist.get_world_size()
    dist.all_gather_object(stages, local)
    if dist.get_rank() != 0:
        return None
    merged: dict[str, torch.Tensor] = {}
    for stage in stages:
        merged.update(stage)
    return merged


def save_hf_checkpoint(state: dict[str, torch.Tensor], hf_config: Qwen2_5_VLConfig, path: Path) -> None:
    """Write `state` as an HF `save_pretrained` directory (what transformers and vLLM load)."""
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(hf_config)
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise KeyError(f"cannot save {path}: no weights for {sorted(missing)[:5]}...")
    model.load_state_dict(state, strict=True, assign=True)
    model.save_pretrained(path)
