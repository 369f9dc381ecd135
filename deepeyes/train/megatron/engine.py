"""The Megatron training engine: model chunks under DDP, the optimizer, and one forward/backward.

It computes what the reference trainer (deepeyes.train.forward.token_logprobs + the losses in
deepeyes.train.losses) computes — per-token logprobs of masked positions, a token-mean loss
over the whole mini-batch — with the work split over tensor, pipeline and data parallel ranks:

- micro-batches are packed rows (deepeyes.train.megatron.batch); data-parallel rank r takes
  every r-th sequence of the mini-batch, so ranks see disjoint sequences;
- a loss function returns (sum of token losses, number of trained tokens); megatron-core adds
  the counts over micro-batches and data-parallel ranks and divides the summed gradients by
  the total (`calculate_per_token_loss`), which is the reference's token mean exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig

from deepeyes.model.load import CheckpointTensors
from deepeyes.model.megatron.convert import export_hf_state, load_hf_weights
from deepeyes.model.megatron.model import Qwen2_5_VLMegatronModel, build_model_chunks
from deepeyes.model.megatron.spec import ParallelLayout, transformer_config
from deepeyes.model.pixels import PixelCache
from deepeyes.train.forward import TokenSequence
from deepeyes.train.megatron.batch import pack, split_by_sequence

log = logging.getLogger(__name__)

# megatron-core logs, at INFO, the name of every parameter of every gradient bucket and its DDP and
# optimizer configs: library internals, shown only when this module logs at DEBUG
# (hydra.verbose=deepeyes.train.megatron.engine, or hydra.verbose=true).
_CHATTY_LOGGERS = ("megatron.core.distributed", "megatron.core.optimizer")

# loss_fn(logprobs of each sequence's masked tokens, indices of those sequences in the mini-batch)
#   -> (sum of token losses, number of trained tokens, {metric: summed value})
LossFn = Callable[[list[torch.Tensor], list[int]], tuple[torch.Tensor, int, dict[str, float]]]


@dataclass
class OptimSettings:
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float
    distributed: bool  # megatron's distributed optimizer (optimizer state sharded over DP ranks)


class MegatronEngine:
    """Model chunks of one rank, wrapped for data parallelism, with their optimizer."""

    def __init__(self, hf_model, pixels: PixelCache, layout: ParallelLayout, optim: OptimSettings,
                 dtype: torch.dtype = torch.float32, weights: Mapping | None = None):
        """`hf_model` gives the config and which parameters train; its weights, or `weights` when
        given (deepeyes.model.load.CheckpointTensors: this rank reads only its own slices, so
        `hf_model` can be a weightless meta model), are copied into this rank's chunks."""
        self.hf_config = hf_model.config
        self.pixels = pixels
        self.layout = layout
        self.config = transformer_config(hf_model.config.text_config, layout, dtype)
        # Per-token loss: gradients are summed over ranks and micro-batches, then divided by
        # the trained-token count of the whole mini-batch (see the module docstring).
        self.config.calculate_per_token_loss = True
        # Every parameter is overwritten by the checkpoint: megatron-core's own initialization
        # would only cost time (and on the CPU a full-size fp32 master copy of each weight).
        self.config.perform_initialization = False
        # The chunks live on this rank's GPU (megatron-core builds its layers there; our norms
        # and the vision tower are moved), or on the CPU without CUDA.
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        chunks = load_chunks(hf_model, self.config, self.device, weights)
        if not log.isEnabledFor(logging.DEBUG):
            for name in _CHATTY_LOGGERS:
                logging.getLogger(name).setLevel(logging.WARNING)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=optim.distributed, overlap_grad_reduce=False,
        )
        self.chunks = [
            DistributedDataParallel(self.config, ddp_config, chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]
        self.config.no_sync_func = [c.no_sync for c in self.chunks] if len(self.chunks) > 1 else self.chunks[0].no_sync
        self.config.finalize_model_grads_func = finalize_model_grads
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=optim.lr, weight_decay=optim.weight_decay, adam_beta1=optim.betas[0],
                adam_beta2=optim.betas[1], adam_eps=1e-8, clip_grad=optim.grad_clip,
                use_distributed_optimizer=optim.distributed, params_dtype=dtype,
                bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
            ),
            self.chunks,
            config_overrides={},  # weight decay on every parameter, as the reference's AdamW
        )
        # Without TransformerEngine or apex, megatron-core steps torch's AdamW with its default
        # multi-pass foreach kernels; the fused kernel (CPU and CUDA) does one pass per tensor
        # group (one H100, 2 B parameters: 55 -> 22 ms). torch reads this flag at every step.
        for group in self.optimizer.param_groups:
            group["fused"] = True

    @property
    def data_rank(self) -> tuple[int, int]:
        return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()

    def micro_batches(self, count: int, micro_batch_size: int) -> list[list[int]]:
        """This rank's share of a mini-batch of `count` sequences, as lists of indices per micro-batch."""
        rank, size = self.data_rank
        mine = list(range(rank, count, size))
        if not mine:
            raise ValueError(f"a mini-batch of {count} sequences cannot feed {size} data-parallel ranks")
        return [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]

    def forward_backward(self, sequences: Sequence[TokenSequence], micro_batch_size: int, loss_fn: LossFn,
                         temperature: float = 1.0, forward_only: bool = False) -> dict[str, float]:
        """Run this rank's micro-batches of `sequences` (the whole mini-batch, same on every rank).

        Returns the loss function's metrics summed over the mini-batch (identical on every rank);
        with `forward_only=False` the gradients are ready for `step()`.
        """
        micro = self.micro_batches(len(sequences), micro_batch_size)
        pad_to = self.layout.tensor if self.config.sequence_parallel else 1
        if self.config.virtual_pipeline_model_parallel_size:
            # The interleaved schedule exchanges no shapes (it hung with variable lengths on
            # gloo): every micro-batch is padded to the mini-batch's longest packed row.
            longest = max(sum(len(sequences[i].ids) for i in indices) for indices in micro)
            pad_to = -(-longest // pad_to) * pad_to
        # Moved to the device before the schedule starts: a host-to-device copy inside it would
        # wait for the GPU to drain its queue at every micro-batch.
        batches = [(pack([sequences[i] for i in indices], self.pixels, self.hf_config, pad_to).to(self.device), indices)
                   for indices in micro]

        def loss_func(indices: list[int], logprobs: torch.Tensor):
            per_sequence = split_by_sequence(logprobs, [sequences[i] for i in indices])
            loss, tokens, metrics = loss_fn(per_sequence, indices)
            return loss, torch.tensor(tokens, dtype=torch.int), metrics

        def forward_step(iterator, model):
            batch, indices = next(iterator)
            return model(batch, temperature), partial(loss_func, indices)

        iterators = [iter(batches) for _ in self.chunks] if len(self.chunks) > 1 else iter(batches)
        if not forward_only:
            for chunk in self.chunks:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators,
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=len(batches),
            seq_length=max(b.input_ids.shape[1] for b, _ in batches),
            micro_batch_size=1,
            forward_only=forward_only,
        )
        return self._sum_metrics(outputs)

    def _sum_metrics(self, outputs: list[dict[str, float]]) -> dict[str, float]:
        """Metrics summed over micro-batches and data-parallel ranks, sent from the last stage to all."""
        totals: dict[str, float] = {}
        for output in outputs if parallel_state.is_pipeline_last_stage() else []:
            for key, value in output.items():
                totals[key] = totals.get(key, 0.0) + float(value)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, totals if parallel_state.get_tensor_model_parallel_rank() == 0 else {})
        summed: dict[str, float] = {}
        for part in gathered:
            for key, value in part.items():
                summed[key] = summed.get(key, 0.0) + value
        return summed

    def step(self, lr: float) -> float:
        """Clip and apply the accumulated gradients at learning rate `lr`; returns the norm before clipping."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise RuntimeError("optimizer step skipped (non-finite gradients)")
        return float(grad_norm)

    def logprobs(self, sequences: Sequence[TokenSequence], micro_batch_size: int,
                 temperature: float = 1.0) -> list[torch.Tensor | None]:
        """Logprobs of every sequence's masked tokens, without gradients (e.g. the old policy's).

        Each sequence's entry is set on the last pipeline stage of the data-parallel rank that
        computed it (the only place the loss needs it); None elsewhere.
        """
        results: list[torch.Tensor | None] = [None] * len(sequences)

        def keep(per_sequence, indices):
            for i, lp in zip(indices, per_sequence):
                results[i] = lp.detach()
            return per_sequence[0].sum() * 0, 0, {}

        with torch.no_grad():
            self.forward_backward(sequences, micro_batch_size, keep, temperature, forward_only=True)
        return results

    def hf_state(self, select=None) -> dict[str, torch.Tensor] | None:
        """Current weights (or `select(param)` of each) as an HF state dict on global rank 0 (collective)."""
        return export_hf_state([c.module for c in self.chunks], self.hf_config, select)


def load_chunks(hf_model, config: TransformerConfig, device: torch.device,
                weights: Mapping | None = None) -> list[Qwen2_5_VLMegatronModel]:
    """This rank's model chunks on `device`, holding its part of the checkpoint: read from
    `weights` (CheckpointTensors: only this rank's slices, so `hf_model` may be a weightless meta
    model) or copied from `hf_model`'s own. `hf_model` gives the config and which vision parameters train."""
    visual = None
    if parallel_state.is_pipeline_first_stage(ignore_virtual=True):
        # A tower of the rank's own: the HF model stays as the caller keeps it (the in-process
        # rollout engine reads it).
        hf_visual = hf_model.model.visual
        with torch.device(device):
            visual = type(hf_visual)._from_config(hf_model.config.vision_config, dtype=config.params_dtype)
        for own, original in zip(visual.parameters(), hf_visual.parameters(), strict=True):
            own.requires_grad_(original.requires_grad)
        visual.train(hf_visual.training)
    chunks = [chunk.to(device) for chunk in build_model_chunks(config, hf_model.config, visual)]
    load_hf_weights(chunks, hf_model.state_dict() if weights is None else weights, hf_model.config)
    return chunks


def build_engine(policy, trainer_cfg, optim_cfg, seed: int) -> MegatronEngine:
    """Join the process groups `trainer_cfg` asks for and build the engine on `policy` (from
    load_policy; its model may be weightless: the engine reads its slices from `policy.path`)."""
    from deepeyes.train.megatron.parallel import init_parallel

    layout = ParallelLayout(
        tensor=trainer_cfg.tensor_parallel, pipeline=trainer_cfg.pipeline_parallel,
        virtual_pipeline=trainer_cfg.virtual_pipeline, sequence_parallel=trainer_cfg.sequence_parallel,
        recompute=trainer_cfg.recompute,
    )
    init_parallel(layout, seed)
    settings = OptimSettings(optim_cfg.lr, optim_cfg.weight_decay, tuple(optim_cfg.betas), optim_cfg.grad_clip,
                             trainer_cfg.distributed_optimizer)
    weights = CheckpointTensors(policy.path)  # each rank reads its own slices, not the whole model
    try:
        return MegatronEngine(policy.model, policy.pixels, layout, settings, policy.model.dtype, weights)
    finally:
        weights.close()
