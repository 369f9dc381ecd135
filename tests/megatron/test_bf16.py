"""bf16 weights (the 7B/32B presets' dtype) on the Megatron engine: megatron-core's mixed-precision
optimizer (fp32 main weights) steps, and the loss matches the HF model's in bf16."""

import torch

from deepeyes.model import ensure_tiny_model, load_model, load_processor
from deepeyes.model.megatron.spec import ParallelLayout
from deepeyes.model.pixels import PixelCache
from deepeyes.train.forward import TokenSequence, token_logprobs
from deepeyes.train.megatron.engine import MegatronEngine, OptimSettings
from deepeyes.train.megatron.parallel import init_parallel
from deepeyes.train.megatron.sft import negative_log_likelihood
from tests.megatron.workers import join


def bf16_step(rank, world, port, results):
    join(rank, world, port)
    path = ensure_tiny_model()
    processor = load_processor(path)
    pixels = PixelCache(processor.image_processor, 3136, 50176)
    model = load_model(path, dtype=torch.bfloat16)
    batch = [TokenSequence(list(range(1000, 1048)), [], [0] + [1] * 47)]
    reference = -token_logprobs(model, pixels, batch, processor.tokenizer.pad_token_id)[0].float().mean()
    init_parallel(ParallelLayout(), seed=0)
    engine = MegatronEngine(model, pixels, ParallelLayout(), OptimSettings(1e-2, 0.0, (0.9, 0.999), 1.0, False),
                            torch.bfloat16)
    weight = engine.chunks[0].module.language.output_layer.weight
    before = weight.detach().clone()
    metrics = engine.forward_backward(batch, 1, negative_log_likelihood)
    norm = engine.step(1e-2)
    results.put({
        "loss": metrics["loss_sum"] / metrics["tokens"], "reference": float(reference), "norm": norm,
        "dtype": str(weight.dtype), "moved": float((weight.detach() - before).abs().max()),
    })


def test_bf16_engine_steps_and_matches_the_hf_loss(run_ranks):
    result = run_ranks(bf16_step, 1)
    assert result["dtype"] == "torch.bfloat16"
    assert abs(result["loss"] - result["reference"]) < 1e-2 * result["reference"], result
    assert result["norm"] > 0 and result["moved"] > 1e-3, result  # lr 1e-2: every weight moves by about that
