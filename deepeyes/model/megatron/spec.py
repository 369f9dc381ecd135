"""The Qwen2.5-VL language model as a megatron-core configuration and layer spec.

`transformer_config` reads the Hugging Face checkpoint's text config (RMSNorm, SwiGLU, QKV bias,
grouped-query attention, mrope sections, rope base) and adds the parallel layout. The layer spec
is megatron-core's local (non-TransformerEngine) GPT layer with our `RMSNorm` and SDPA core
attention; it runs on CPU and GPU alike (bench/mfu.py measures it on an H100). A
TransformerEngine spec is not wired up: TE's torch extension is published only as source that
compiles against the installed torch (no wheel for torch 2.11 / CUDA 13), and the conversion
would need to map TE's fused norm+linear parameter names.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.varlen import varlen_attn
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build


@dataclass(frozen=True)
class ParallelLayout:
    """How one model is split over ranks (`data` is what is left of the world)."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int = 1  # model chunks per pipeline rank (interleaved 1F1B when > 1)
    sequence_parallel: bool = False
    recompute: bool = False  # full activation recompute of every layer


class RMSNorm(torch.nn.Module):
    """Qwen2's RMSNorm, computed exactly as the Hugging Face module does (fp32 statistics).

    megatron-core's torch-backed norm refuses sequence parallelism; this one marks its weight
    `sequence_parallel` so megatron all-reduces its gradient over the tensor-parallel group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        # torch's rms_norm: x * rsqrt(mean(x²) + eps), as HF writes it out, in one fused kernel on GPU
        hidden = F.rms_norm(hidden.to(torch.float32), hidden.shape[-1:], eps=self.eps)
        return self.weight * hidden.to(dtype)


class SDPAttention(torch.nn.Module):
    """Core attention through torch's fused kernels (megatron-core's local DotProductAttention
    materializes and masks the full score matrix in separate ops). Grouped-query attention
    without repeating keys/values.

    A lone causal sequence runs `scaled_dot_product_attention` (flash on GPU); several sequences
    packed in one row run flash attention per sequence on GPU (`varlen_attn`, given megatron's
    PackedSeqParams), and SDPA with the block-diagonal `attention_mask` on the CPU."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None, **_unused):
        super().__init__()
        self.scale = softmax_scale if softmax_scale is not None else config.kv_channels**-0.5

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query (sq, b, heads, d), key/value (sk, b, groups, d) → (sq, b, heads * d).
        `attention_mask` is megatron's: True where attention is NOT allowed; None = causal."""
        if packed_seq_params is not None:  # b == 1: one packed row
            p = packed_seq_params
            out = varlen_attn(query[:, 0], key[:, 0], value[:, 0], p.cu_seqlens_q, p.cu_seqlens_kv,
                              p.max_seqlen_q, p.max_seqlen_kv, scale=self.scale, **_VARLEN_CAUSAL)
            return out.reshape(query.shape[0], 1, -1)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if attention_mask is None else ~attention_mask,
            is_causal=attention_mask is None, scale=self.scale, enable_gqa=True,
        )
        return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)


# varlen_attn's causal window. torch 2.11 (what our GPU machines run) has no `enable_gqa` flag
# and takes fewer key/value heads as they are (tests/megatron/test_batch.py ran there); 2.13 asks for it.
_VARLEN_CAUSAL = {"window_size": (-1, 0)}
if "enable_gqa" in inspect.signature(varlen_attn).parameters:
    _VARLEN_CAUSAL["enable_gqa"] = True


def transformer_config(text_config, layout: ParallelLayout, dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """megatron-core's TransformerConfig for a Qwen2.5-VL text config (`hf_config.text_config`)."""
    rope = text_config.rope_parameters
    if rope.get("rope_type", "default") != "default" or "mrope_section" not in rope:
        raise ValueError(f"text_config.rope_parameters={rope}: expected default-type mrope with mrope_section")
    head_dim = text_config.hidden_size // text_config.num_attention_heads
    if sum(rope["mrope_section"]) * 2 != head_dim:
        raise ValueError(f"mrope_section {rope['mrope_section']} must sum to head_dim/2 = {head_dim // 2}")
    if text_config.hidden_act != "silu":
        raise ValueError(f"text_config.hidden_act={text_config.hidden_act!r}: Qwen2.5-VL uses silu (SwiGLU)")
    if text_config.num_key_value_heads % layout.tensor or text_config.vocab_size % layout.tensor:
        raise ValueError(
            f"tensor parallel size {layout.tensor} must divide the key/value heads "
            f"({text_config.num_key_value_heads}) and the vocabulary ({text_config.vocab_size})"
        )
    cuda = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=text_config.num_hidden_layers,
        hidden_size=text_config.hidden_size,
        ffn_hidden_size=text_config.intermediate_size,
        num_attention_heads=text_config.num_attention_heads,
        num_query_groups=text_config.num_key_value_heads,
        kv_channels=head_dim,
        layernorm_epsilon=text_config.rms_norm_eps,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        mrope_section=list(rope["mrope_section"]),
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline if layout.virtual_pipeline > 1 else None,
        sequence_parallel=layout.sequence_parallel and layout.tensor > 1,
        recompute_granularity="full" if layout.recompute else None,
        recompute_method="uniform" if layout.recompute else None,
        recompute_num_layers=1 if layout.recompute else None,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Packed micro-batches differ in length: pipeline stages exchange shapes first (the
        # interleaved schedule instead gets micro-batches padded to one length, see engine).
        variable_seq_lengths=layout.virtual_pipeline == 1,
        moe_token_dispatcher_type="alltoall",  # no MoE here; the default one rejects variable lengths
        # Interleaved 1F1B with batched send/recv gives wrong results on gloo.
        batch_p2p_comm=cuda,
        # The fused kernels below exist only on CUDA (apex/TE); the CPU path needs them off.
        use_cpu_initialization=not cuda,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )


def decoder_block_spec(config: TransformerConfig, vp_stage: int | None) -> TransformerBlockSubmodules:
    """The layers this (pipeline rank, virtual stage) builds: megatron-core's local GPT layer with
    our RMSNorm before attention, before the MLP and after the last layer."""
    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer.submodules.input_layernorm = RMSNorm
    layer.submodules.pre_mlp_layernorm = RMSNorm
    layer.submodules.self_attention.submodules.core_attention = SDPAttention
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * count, layer_norm=RMSNorm)
