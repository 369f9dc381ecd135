"""Qwen2.5-VL on megatron-core: the HF vision tower feeding a megatron-core GPT language model.

megatron-core has no Qwen2.5-VL vision tower, so the tower (ViT + merger) stays the Hugging Face
module, frozen by default. On the first pipeline stage its output replaces the word embeddings
at `<|image_pad|>` positions, exactly where the HF model puts it; later stages only see hidden
states. The GPT model is used as the container of embedding, decoder, output layer and mrope
(its parameter names are what dist-checkpointing and the conversion know); the forward here
runs them itself so that the output layer projects only the positions a loss needs — with a
150k vocabulary those logits, not the layers, dominate time and memory.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

from deepeyes.model.megatron.spec import decoder_block_spec

IMAGE_TOKEN_ID = 151655


@dataclass
class PackedBatch:
    """Several token sequences packed into one row (padding-free), as every stage sees it.

    Attention is causal inside each sequence and nothing crosses sequences: sequence i is
    positions `cu_seqlens[i]:cu_seqlens[i + 1]` (int32; the longest is `max_seqlen`), or
    `cu_seqlens` is None when the row is one sequence without padding (plain causal attention).
    `positions` are the (3, 1, T) mrope positions, restarting per sequence.
    `logit_positions[i]` predicts `targets[i]` (the next token).
    """

    input_ids: torch.Tensor  # (1, T)
    positions: torch.Tensor  # (3, 1, T)
    logit_positions: torch.Tensor  # (K,)
    targets: torch.Tensor  # (K,)
    cu_seqlens: torch.Tensor | None = None  # (sequences + 1,) int32
    max_seqlen: int = 0
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None

    def to(self, device: torch.device) -> "PackedBatch":
        """The same batch with every tensor on `device` (batches are packed on the host)."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


class Qwen2_5_VLMegatronModel(MegatronModule):
    """One pipeline stage (or virtual chunk) of Qwen2.5-VL: vision tower on the first, output layer on the last."""

    def __init__(self, config, hf_config: Qwen2_5_VLConfig, visual: torch.nn.Module | None,
                 pre_process: bool, post_process: bool, vp_stage: int | None = None):
        super().__init__(config=config)
        text = hf_config.text_config
        self.pre_process, self.post_process = pre_process, post_process
        self.model_type = ModelType.encoder_or_decoder  # what pipeline schedules ask of a model
        self.image_token_id = hf_config.image_token_id
        self.language = GPTModel(
            config=config,
            transformer_layer_spec=decoder_block_spec(config, vp_stage),
            vocab_size=text.vocab_size,
            max_sequence_length=text.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
            position_embedding_type="mrope",
            rotary_base=int(text.rope_parameters["rope_theta"]),
            # The image embeddings are spliced in first; this module scatters the sequence itself.
            scatter_embedding_sequence_parallel=False,
            vp_stage=vp_stage,
        )
        self.visual = visual if pre_process else None

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand a later stage its input here."""
        self.language.set_input_tensor(input_tensor)

    # finalize_model_grads asks the model these two, to sync tied embeddings across stages.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language.shared_embedding_or_output_weight()

    def forward(self, batch: PackedBatch, temperature: float = 1.0) -> torch.Tensor:
        """Last stage: log p(targets) at `logit_positions`, shape (K,). Other stages: hidden states."""
        language = self.language
        decoder_input = self._embed(batch) if self.pre_process else None
        rotary = language.rotary_pos_emb(batch.positions, language.mrope_section)
        mask, packed = None, None
        half_precision = self.config.params_dtype in (torch.float16, torch.bfloat16)
        if batch.cu_seqlens is not None and batch.cu_seqlens.is_cuda and half_precision:
            # Flash attention per sequence (spec.SDPAttention); megatron passes an "sbhd"
            # PackedSeqParams through to core attention untouched. The flash kernel takes half
            # precision only: an fp32 model (the tiny one's default) takes the masked path below.
            cu, longest = batch.cu_seqlens, batch.max_seqlen
            packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                     max_seqlen_q=longest, max_seqlen_kv=longest)
        elif batch.cu_seqlens is not None:
            mask = block_causal_mask(batch.cu_seqlens)  # no varlen kernel here: SDPA with a mask
        hidden = language.decoder(hidden_states=decoder_input, attention_mask=mask, rotary_pos_emb=rotary,
                                  packed_seq_params=packed)
        if not self.post_process:
            return hidden
        if self.config.sequence_parallel:
            # The gradient arriving here is already whole on every rank (the all-reduce in
            # copy_to_tensor_model_parallel_region below), so its backward only splits it.
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        selected = hidden[batch.logit_positions, 0]  # (K, hidden)
        weight = language.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights \
            else language.output_layer.weight
        logits = torch.nn.functional.linear(tensor_parallel.copy_to_tensor_model_parallel_region(selected), weight)
        if temperature != 1.0:
            logits = logits.float() / temperature
        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            # The whole vocabulary is on this rank. Megatron's vocab-parallel version needs an
            # fp32 copy of the (K, vocab) logits and makes more passes over it: on one H100 it made
            # bench/mfu.py's step ~4 % slower. (On the CPU it is the faster one, ~5 % of
            # bench/train_step.py's step.)
            return (compiled_target_logprobs if logits.is_cuda else target_logprobs)(logits, batch.targets)
        return -tensor_parallel.vocab_parallel_cross_entropy(logits.float(), batch.targets)

    def _embed(self, batch: PackedBatch) -> torch.Tensor:
        """Word embeddings with the vision tower's output at image positions, as (T, 1, hidden)."""
        embeddings = self.language.embedding(input_ids=batch.input_ids, position_ids=None)  # (T, 1, h)
        if batch.pixel_values is not None:
            visual = self.visual
            image_embeds = visual(batch.pixel_values.to(visual.dtype), grid_thw=batch.image_grid_thw).pooler_output
            image_positions = (batch.input_ids[0] == self.image_token_id).nonzero().squeeze(1)
            if image_positions.numel() != image_embeds.shape[0]:
                raise ValueError(
                    f"{image_positions.numel()} <|image_pad|> tokens but the images give {image_embeds.shape[0]} embeddings"
                )
            embeddings = embeddings.index_put((image_positions, torch.zeros_like(image_positions)),
                                              image_embeds.to(embeddings.dtype))
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
        return embeddings


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i]) under the row logits[i], in fp32."""
    return torch.log_softmax(logits, dim=-1, dtype=torch.float32).gather(1, targets[:, None])[:, 0]


# On a GPU, compiled: eager keeps the (K, vocab) fp32 log-softmax for the backward and builds a
# second one for the gather's gradient; the compiled kernels keep the bf16 logits and a per-row
# statistic and write the gradient in one pass. One H100, bench/mfu.py (4 layers, 2 x 4096 tokens
# per micro-batch): 0.393 -> 0.381 s per step, peak memory 60.8 -> 56.2 GB. Not on the CPU,
# where compiling would cost more than the tests' steps take.
compiled_target_logprobs = torch.compile(target_logprobs, dynamic=True)


def block_causal_mask(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(1, 1, T, T) bool, True where query q may NOT attend key k: causal inside each sequence
    of `cu_seqlens`, nothing across sequences (megatron's mask convention)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)
    total = owner.numel()
    later = torch.ones(total, total, dtype=torch.bool, device=cu_seqlens.device).triu(1)
    return ((owner[:, None] != owner[None, :]) | later)[None, None]


class _RopeIndex:
    """Qwen2.5-VL's own mrope position rule (`Qwen2_5_VLModel.get_rope_index`), without its weights."""

    def __init__(self, config: Qwen2_5_VLConfig):
        self.config = config

    get_rope_index = Qwen2_5_VLModel.get_rope_index
    get_vision_position_ids = Qwen2_5_VLModel.get_vision_position_ids


def mrope_positions(config: Qwen2_5_VLConfig, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None) -> torch.Tensor:
    """(3, len) mrope positions of one unpadded sequence whose images have grids `image_grid_thw`."""
    ids = input_ids.unsqueeze(0)
    types = (ids == config.image_token_id).to(torch.int32)
    positions, _ = _RopeIndex(config).get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=image_grid_thw)
    return positions[:, 0]


def build_model_chunks(config, hf_config: Qwen2_5_VLConfig, visual: torch.nn.Module | None) -> list[Qwen2_5_VLMegatronModel]:
    """This rank's model chunks (one, or one per virtual pipeline stage when interleaved)."""
    chunks = []
    virtual = config.virtual_pipeline_model_parallel_size
    for vp_stage in range(virtual or 1):
        stage = vp_stage if virtual else None
        chunks.append(Qwen2_5_VLMegatronModel(
            config, hf_config, visual,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage,
        ))
    return chunks
