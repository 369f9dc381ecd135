"""The `hf` rollout backend: transformers generation, batching concurrent trajectories together.

Token ids in, token ids + per-token logprobs out: the caller never re-tokenizes model output.

Sampling is done by Gumbel-max with a noise stream seeded per request (not by transformers'
global-RNG sampler), so what a trajectory samples does not depend on which other requests
happened to share its batch: a run is reproducible from its seed even though batches form by
timing. The logprob reported for each token is under the exact distribution it was drawn from
(temperature and top-p applied).

The same code runs on a CPU (float32, gloo) and on a GPU (the server loads the model in bfloat16
on CUDA when there is one; weights then arrive over NCCL). Weight updates pause generation: the
batch in progress finishes, no new batch starts until the new weights are in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from datetime import timedelta
from pathlib import Path
from typing import Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from deepeyes.model import model_inputs
from deepeyes.model.pixels import PixelCache
from deepeyes.rollout.api import GenerateRequest, GenerateResult, SamplingParams
from deepeyes.rollout.weight_sync import WeightGroup, join_weight_group, load_weights, receive_buckets, weights_digest

log = logging.getLogger(__name__)

__all__ = ["GenerateRequest", "GenerateResult", "HFRolloutEngine", "SamplingParams"]


class _GumbelSampler(LogitsProcessor):
    """Turns greedy decoding into exact sampling and records each sampled token's logprob."""

    def __init__(self, requests: Sequence[GenerateRequest], prompt_len: int):
        # Temperature 0 is greedy: no noise, and logprobs of the unscaled distribution.
        self._temperature = torch.tensor([[r.sampling.temperature or 1.0] for r in requests])
        self._sampled = torch.tensor([[float(r.sampling.temperature > 0)] for r in requests])
        self._top_p = [r.sampling.top_p for r in requests]
        self._noise = [torch.Generator().manual_seed(r.sampling.seed) for r in requests]
        self._prompt_len = prompt_len
        self._last_logprobs: torch.Tensor | None = None
        self.logprobs: list[list[float]] = [[] for _ in requests]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] > self._prompt_len:
            self.record(input_ids[:, -1])
        logprobs = torch.log_softmax(scores.float() / self._temperature.to(scores.device), dim=-1)
        for row, top_p in enumerate(self._top_p):
            if top_p < 1.0:
                logprobs[row] = _top_p_filter(logprobs[row], top_p)
        self._last_logprobs = logprobs
        uniform = torch.stack([torch.rand(scores.shape[1], generator=g) for g in self._noise])
        exponential = (-torch.log(uniform.clamp_min(1e-20))).clamp_min(1e-20)
        gumbel = -torch.log(exponential) * self._sampled
        return logprobs + gumbel.to(scores.device)

    def record(self, tokens: torch.Tensor) -> None:
        chosen = self._last_logprobs.gather(1, tokens[:, None].to(self._last_logprobs.device))[:, 0]
        for row, value in enumerate(chosen.tolist()):
            self.logprobs[row].append(value)


def _top_p_filter(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Renormalized log-distribution over the smallest set of tokens with mass ≥ top_p."""
    sorted_lp, order = torch.sort(logprobs, descending=True)
    mass_before = torch.cumsum(sorted_lp.exp(), 0) - sorted_lp.exp()
    sorted_lp[mass_before > top_p] = float("-inf")
    filtered = torch.full_like(logprobs, float("-inf")).scatter(0, order, sorted_lp)
    return torch.log_softmax(filtered, dim=-1)


def request_inputs(requests: Sequence[GenerateRequest], pixels: PixelCache, pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded model inputs for a batch of requests; their images are decoded here, where
    they are consumed, through the (bounded) pixel cache."""
    length = max(len(r.input_ids) for r in requests)
    input_ids = torch.full((len(requests), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, request in enumerate(requests):
        input_ids[row, length - len(request.input_ids):] = torch.tensor(request.input_ids)
        attention_mask[row, length - len(request.input_ids):] = 1
    pixel_values, grid_thw = pixels.batch([image for request in requests for image in request.images])
    return model_inputs(input_ids, attention_mask, pixel_values, grid_thw)


class HFRolloutEngine:
    """Serves `generate` requests from many coroutines with batched `model.generate` calls.

    Generation runs in a worker thread, so tool calls of other trajectories proceed meanwhile.
    """

    weight_transfer_ranks = 1  # ranks this engine adds to a weight-broadcast group (one process)

    def __init__(self, model, tokenizer, pixels: PixelCache, max_batch: int = 16, batch_wait_ms: float = 5.0,
                 weight_timeout_s: float = 600.0):
        self.model = model
        self.tokenizer = tokenizer
        self.pixels = pixels
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000
        self.weight_version = 0  # -1 while a broadcast is incomplete: never served as any version
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.device = next(model.parameters()).device
        self.eos_ids = sorted({tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")})
        self.pad_id = tokenizer.pad_token_id
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._lock = threading.Lock()  # one generate at a time on the shared model; held while paused
        self._weight_group: WeightGroup | None = None
        self._packed = True  # how the trainer sends: announced when the group forms
        self._weight_timeout = timedelta(seconds=weight_timeout_s)
        self.batches_served = 0

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._serve())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((request, future))
        return await future

    @contextlib.asynccontextmanager
    async def paused(self):
        """Generation paused for the block (see `pause_generation`)."""
        await self.pause_generation()
        try:
            yield
        finally:
            await self.resume_generation()

    async def pause_generation(self) -> None:
        """The batch in progress finishes, no new batch starts (queued requests wait and are then
        served with whatever weights the pause left). Waits at most the weight timeout."""
        timeout = self._weight_timeout.total_seconds()
        if not await asyncio.to_thread(self._lock.acquire, True, timeout):
            raise TimeoutError(f"generation did not pause within {timeout:.0f}s (a batch still running)")

    async def resume_generation(self) -> None:
        self._lock.release()

    async def update_weights(self, path: Path, version: int) -> None:
        """Load published weights from a file (the `file` weight sync), generation paused."""
        async with self.paused():
            await asyncio.to_thread(load_weights, self.model, path)
            self.weight_version = version
            self.pixels.release()

    def init_weight_transfer(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                             packed: bool = True) -> None:
        """Join the trainer's weight-broadcast group as rank `rank_offset` (blocks until every rank
        has joined); `packed` is how the trainer sends, fixed for the group. A previous group is
        left first: the trainer re-forms the group when a server restarts."""
        self.close_weight_transfer()
        self._weight_group = join_weight_group(master_address, master_port, rank_offset, world_size,
                                               self.device, self._weight_timeout)
        self._packed = packed

    def close_weight_transfer(self) -> None:
        if self._weight_group is not None:
            self._weight_group.close()
            self._weight_group = None

    @property
    def in_weight_group(self) -> bool:
        return self._weight_group is not None

    def check_weight_update(self, packed: bool) -> None:
        """Refuse, before anyone broadcasts, an update this engine cannot take."""
        if self._weight_group is None:
            raise RuntimeError("no weight-broadcast group: the trainer must call init_weight_transfer first")
        if packed != self._packed:
            raise ValueError(f"the trainer sends packed={packed} but this engine joined the group with "
                             f"packed={self._packed}: both are fixed when the group is set up")

    async def receive_weights(self, version: int, names: list[str], dtype_names: list[str], shapes: list[list[int]],
                              packed: bool) -> None:
        """Receive `version` from the trainer's broadcast, bucket by bucket into the parameters; the
        caller has paused generation (`pause_generation`). If the broadcast breaks midway the weights
        are a mix of two versions: the engine then reports version -1 (never served) and leaves the
        group until re-formed."""
        self.check_weight_update(packed)
        try:
            await asyncio.to_thread(self._receive, names, dtype_names, shapes, packed)
        except BaseException:
            self.weight_version = -1
            self.close_weight_transfer()
            raise
        self.weight_version = version
        self.pixels.release()

    def _receive(self, names: list[str], dtype_names: list[str], shapes: list[list[int]], packed: bool) -> None:
        params = dict(self.model.named_parameters())
        mismatched = [f"{name} {shape} (served model: {None if name not in params else list(params[name].shape)})"
                      for name, shape in zip(names, shapes)
                      if name not in params or list(params[name].shape) != list(shape)]

        def load(bucket: list[tuple[str, torch.Tensor]]) -> None:
            if mismatched:
                return  # still take every bucket, so the trainer and the other servers finish
            with torch.no_grad():
                for name, tensor in bucket:
                    params[name].copy_(tensor)

        def into(name: str, shape: list[int], dtype: torch.dtype) -> torch.Tensor | None:
            param = None if mismatched else params[name]
            return param.data if param is not None and param.dtype == dtype and param.is_contiguous() else None

        receive_buckets(self._weight_group, names, dtype_names, shapes, packed, load, into)
        if mismatched:
            raise ValueError(f"broadcast weights do not fit the served model: {'; '.join(mismatched[:5])}")

    def weights_digest(self) -> str:
        """SHA-256 of the served weights (see `weight_sync.weights_digest`), between batches."""
        with self._lock:
            return weights_digest(self.model)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        self.close_weight_transfer()

    async def _serve(self) -> None:
        while True:
            batch = [await self._queue.get()]
            await asyncio.sleep(self.batch_wait_s)  # let the other ready coroutines join
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._serve_batch(batch)

    async def _serve_batch(self, batch: list) -> None:
        """One batched generate; if it fails, each request alone, so one bad request fails only itself."""
        try:
            results = await asyncio.to_thread(self.generate_batch, [request for request, _ in batch])
        except Exception as error:
            if len(batch) > 1:
                log.warning("a batch of %d failed (%s); serving its requests one by one", len(batch), error)
                for item in batch:
                    await self._serve_batch([item])
                return
            if not batch[0][1].done():
                batch[0][1].set_exception(error)
            return
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)

    def generate_batch(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        """One left-padded batched generate over these requests (synchronous)."""
        with self._lock, torch.no_grad():
            self.batches_served += 1
            inputs = {key: value.to(self.device) for key, value in
                      request_inputs(requests, self.pixels, self.pad_id).items()}
            length = inputs["input_ids"].shape[1]
            sampler = _GumbelSampler(requests, length)
            max_new = max(r.sampling.max_new_tokens for r in requests)
            config = GenerationConfig(
                do_sample=False, max_new_tokens=max_new, eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
                stop_strings=sorted({s for r in requests for s in r.sampling.stop}) or None,
            )
            self.model.eval()
            sequences = self.model.generate(
                **inputs,
                generation_config=config,
                logits_processor=LogitsProcessorList([sampler]),
                tokenizer=self.tokenizer,
            )
            new_tokens = sequences[:, length:]
            sampler.record(new_tokens[:, -1])
            return [
                self._finish(request, new_tokens[row].tolist(), sampler.logprobs[row])
                for row, request in enumerate(requests)
            ]

    def _finish(self, request: GenerateRequest, tokens: list[int], logprobs: list[float]) -> GenerateResult:
        """Cut a row where this request ends: its own eos, stop string or token limit."""
        limit = request.sampling.max_new_tokens
        text = ""
        for index, token in enumerate(tokens[:limit]):
            if token in self.eos_ids:
                return self._result(tokens, logprobs, index + 1, "eos")
            piece = self.tokenizer.decode([token])
            text += piece
            tail = text[-(len(piece) + max((len(s) for s in request.sampling.stop), default=0)):]
            if any(stop in tail for stop in request.sampling.stop):
                return self._result(tokens, logprobs, index + 1, "stop")
        return self._result(tokens, logprobs, min(limit, len(tokens)), "length")

    def _result(self, tokens, logprobs, end: int, reason: str) -> GenerateResult:
        return GenerateResult(tokens[:end], logprobs[:end], reason, self.weight_version)
