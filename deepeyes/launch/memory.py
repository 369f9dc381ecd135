"""GPU memory of a job, estimated from the model's shape and the config before anything is queued.

A trainer rank holds (bytes per parameter of its shard, megatron-core as deepeyes.train.megatron
configures it):

    weights      2 (bf16; 4 in fp32)
    gradients    4 (fp32 gradient buffer: grad_reduce_in_fp32)
    optimizer    4 (fp32 main weights; none in fp32) + 8 (Adam's two moments), divided by the
                 data-parallel size with `trainer.distributed_optimizer`

(the reference trainer, trainer=hf: gradients and AdamW's moments in the weights' dtype) plus
the frozen vision tower (weights only, on the first pipeline stage), and activations for one
micro-batch of `tokens` (its sequences packed into one row), per token and decoder layer:

    replicated over TP  (8 + 4a)·h      each RMSNorm keeps its fp32 input (4h) and two a·h tensors
    sharded over TP     a·(3q + 3kv + 4f)  the fused QKV output, rotated q and k, attention output;
                                        gate and up (2f), silu(gate), their product
    (sequence parallel shards the replicated part too; a = 2 bytes in bf16, q = heads x head_dim,
    kv = kv heads x head_dim, f = the MLP width)

With `trainer.recompute` a layer keeps only its input (a·h) and one layer's activations are
rebuilt at a time. Under 1F1B the first pipeline stage holds `pipeline_parallel` micro-batches in
flight. The output layer needs (2a + 4)·V/TP bytes per token (the logits kept for the backward,
their gradient, an fp32 working copy in the log-softmax) and its weight's gradient (a·V·h/TP).

Checked against bench/mfu.py (one H100, the 7B shape with 4 layers, 2 x 4096 tokens per
micro-batch, TP=1, no recompute, the HF copy of the language model also on the GPU): the formula
gives 55.9 GiB, the measured peak was 56.2 GiB (60.8 GiB before the log-softmax was compiled);
4 sequences per micro-batch ran (72.5 GiB estimated); 8 layers at 1 sequence per micro-batch ran
(68.5 GiB) and at 2 ran out of the 80 GB (80.4 GiB). tests/launch/test_memory.py keeps these.

A rollout GPU gives vLLM `rollout.gpu_memory_utilization` of its memory; the engine's weights
(all parameters / TP) and a workspace for activations and CUDA graphs come out of it, and what is
left holds the KV cache: 2 (K and V) x layers x kv heads x head_dim x a bytes per token, split
over TP. vLLM refuses to start when it cannot hold one sequence of `max_model_len`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
# What a trainer GPU loses before the model: the CUDA context, NCCL's buffers and the
# allocator's fragmentation.
TRAINER_RESERVE_GIB = 6.0
# vLLM's own activations while profiling, the sampler and CUDA graphs, inside its share.
ROLLOUT_WORKSPACE_GIB = 3.0
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class VisionShape:
    depth: int = 32
    hidden: int = 1280
    intermediate: int = 3420
    out_hidden: int = 3584
    patch: int = 14
    temporal_patch: int = 2
    channels: int = 3
    merge: int = 2

    @property
    def parameters(self) -> int:
        """Qwen2.5-VL's vision tower: patch embedding, blocks (RMSNorms, QKV and output
        projections with biases, a biased SwiGLU) and the merger onto the language width."""
        h, f = self.hidden, self.intermediate
        block = 2 * h + (3 * h * h + 3 * h) + (h * h + h) + (3 * h * f + 2 * f + h)
        merged = h * self.merge**2
        merger = h + merged * merged + merged + merged * self.out_hidden + self.out_hidden
        return self.channels * self.temporal_patch * self.patch**2 * h + self.depth * block + merger


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    vision: VisionShape
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_parameters(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = h * (q + 2 * kv) + (q + 2 * kv) + q * h
        return attention + 3 * h * self.intermediate + 2 * h

    @property
    def embedding_parameters(self) -> int:
        return self.vocab * self.hidden

    @property
    def language_parameters(self) -> int:
        output = 0 if self.tied_embeddings else self.embedding_parameters
        return self.embedding_parameters + output + self.layers * self.layer_parameters + self.hidden

    @property
    def parameters(self) -> int:
        return self.language_parameters + self.vision.parameters

    @classmethod
    def from_config_json(cls, path: Path) -> "ModelShape":
        """From a Hugging Face Qwen2.5-VL config.json (the text settings at the top level, as the
        released checkpoints write them, or under text_config, as transformers 5 does)."""
        config = json.loads(path.read_text())
        text = config.get("text_config") or config
        vision = config.get("vision_config", {})
        defaults = VisionShape()
        return cls(
            hidden=text["hidden_size"], layers=text["num_hidden_layers"], heads=text["num_attention_heads"],
            kv_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
            intermediate=text["intermediate_size"], vocab=text["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            vision=VisionShape(
                depth=vision.get("depth", defaults.depth), hidden=vision.get("hidden_size", defaults.hidden),
                intermediate=vision.get("intermediate_size", defaults.intermediate),
                out_hidden=vision.get("out_hidden_size", text["hidden_size"]),
                patch=vision.get("patch_size", defaults.patch),
                temporal_patch=vision.get("temporal_patch_size", defaults.temporal_patch),
                channels=vision.get("in_channels", vision.get("in_chans", defaults.channels)),
                merge=vision.get("spatial_merge_size", defaults.merge),
            ),
        )


# The paper's models, for a plan made where their checkpoints cannot be read (a laptop, a login
# node without the shared filesystem). A readable model.path's config.json wins.
KNOWN_SHAPES = {
    "qwen2_5_vl_7b": ModelShape(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064,
                                vision=VisionShape(out_hidden=3584)),
    "qwen2_5_vl_32b": ModelShape(hidden=5120, layers=64, heads=40, kv_heads=8, intermediate=27648, vocab=152064,
                                 vision=VisionShape(out_hidden=5120)),
}


def model_shape(name: str, path: Path | None) -> ModelShape | None:
    """The shape of the configured model: its checkpoint's config.json when readable, else the
    known shape of `name`; None for an unknown model without a readable checkpoint."""
    if path is not None and (path / "config.json").is_file():
        return ModelShape.from_config_json(path / "config.json")
    return KNOWN_SHAPES.get(name)


@dataclass(frozen=True)
class TrainerLayout:
    """How the trainer is split, and what one micro-batch holds."""

    tensor: int
    pipeline: int
    data: int
    sequence_parallel: bool
    distributed_optimizer: bool
    recompute: bool
    tokens: int  # per micro-batch (its sequences packed into one row)
    dtype: str
    megatron: bool = True  # False: the reference trainer (gradients and AdamW state in the weights' dtype)


@dataclass(frozen=True)
class TrainerMemory:
    """GiB on the fullest trainer GPU."""

    weights: float
    gradients: float
    optimizer: float
    vision: float
    activations: float  # with the layout's recompute setting
    activations_other: float  # with the other one (to say what recompute would change)
    output: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.vision + self.activations + self.output

    def describe(self, layout: TrainerLayout) -> str:
        other = "without" if layout.recompute else "with"
        return (f"~{self.total:.1f} GiB = weights {self.weights:.1f} + gradients {self.gradients:.1f} + optimizer "
                f"{self.optimizer:.1f} + vision tower {self.vision:.1f} + activations {self.activations:.1f} "
                f"({other} recompute: {self.activations_other:.1f}) + output layer {self.output:.1f}")


def trainer_memory(shape: ModelShape, layout: TrainerLayout) -> TrainerMemory:
    """The estimate of the module docstring for the rank that holds the most: with pipeline
    parallelism, the first stage (embedding, vision tower, a micro-batch in flight per stage) or
    the last (the output layer, one micro-batch in flight)."""
    first = _stage_memory(shape, layout, first=True, last=layout.pipeline == 1)
    if layout.pipeline == 1:
        return first
    return max(first, _stage_memory(shape, layout, first=False, last=True), key=lambda stage: stage.total)


def _stage_memory(shape: ModelShape, layout: TrainerLayout, first: bool, last: bool) -> TrainerMemory:
    a = DTYPE_BYTES[layout.dtype]
    tp, pp = layout.tensor, layout.pipeline
    stage_layers = math.ceil(shape.layers / pp)
    output = 0 if shape.tied_embeddings and not first else shape.embedding_parameters
    params = (stage_layers * shape.layer_parameters + first * shape.embedding_parameters + last * output) / tp
    gradient_bytes = 4 if layout.megatron else a
    optimizer_bytes = ((4 if a < 4 else 0) + 8) if layout.megatron else 2 * a
    optimizer_shards = layout.data if layout.distributed_optimizer else 1

    h, d = shape.hidden, shape.head_dim
    q, kv = shape.heads * d, shape.kv_heads * d
    replicated = (8 + 4 * a) * h
    sharded = a * (3 * q + 3 * kv + 4 * shape.intermediate)
    per_layer = (replicated / tp if layout.sequence_parallel else replicated) + sharded / tp
    layer_input = a * h / (tp if layout.sequence_parallel else 1)
    in_flight = pp if first else 1  # 1F1B: the first stage holds a micro-batch per stage
    full = stage_layers * in_flight * per_layer
    recomputed = stage_layers * in_flight * layer_input + per_layer
    tokens = layout.tokens
    logits = (2 * a + 4) * shape.vocab / tp * tokens + a * shape.vocab * h / tp + 3 * a * h * tokens if last else 0
    return TrainerMemory(
        weights=a * params / GIB,
        gradients=gradient_bytes * params / GIB,
        optimizer=optimizer_bytes * params / optimizer_shards / GIB,
        vision=a * shape.vision.parameters / GIB if first else 0.0,
        activations=(recomputed if layout.recompute else full) * tokens / GIB,
        activations_other=(full if layout.recompute else recomputed) * tokens / GIB,
        output=logits / GIB,
    )


@dataclass(frozen=True)
class RolloutMemory:
    """GiB on one GPU of a rollout engine."""

    share: float  # gpu_memory_utilization x the GPU
    weights: float
    workspace: float
    kv_cache: float  # what is left for it
    kv_per_sequence: float  # one sequence of max_model_len
    max_model_len: int

    @property
    def sequences(self) -> int:
        """Sequences of max_model_len whose KV cache fits at once."""
        return max(int(self.kv_cache // self.kv_per_sequence), 0)

    def describe(self) -> str:
        return (f"{self.share:.1f} GiB share = weights {self.weights:.1f} + workspace {self.workspace:.1f} + KV cache "
                f"{self.kv_cache:.1f} ({self.sequences} sequences of {self.max_model_len} tokens at once)")


def rollout_memory(shape: ModelShape, tensor_parallel: int, dtype: str, gpu_gib: float, utilization: float,
                   max_model_len: int) -> RolloutMemory:
    a = DTYPE_BYTES[dtype]
    share = utilization * gpu_gib
    weights = a * shape.parameters / tensor_parallel / GIB
    kv_heads = max(shape.kv_heads / tensor_parallel, 1)  # vLLM replicates KV heads when TP exceeds them
    kv_per_token = 2 * shape.layers * kv_heads * shape.head_dim * a
    return RolloutMemory(
        share=share, weights=weights, workspace=ROLLOUT_WORKSPACE_GIB,
        kv_cache=share - weights - ROLLOUT_WORKSPACE_GIB, kv_per_sequence=kv_per_token * max_model_len / GIB,
        max_model_len=max_model_len,
    )
