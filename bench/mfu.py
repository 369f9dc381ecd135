"""Model FLOPs utilization of a Qwen2.5-VL-7B-shaped SFT step on the Megatron trainer, one GPU.

    python bench/mfu.py [--layers 4] [--batch 4] [--seq 4096] [--micro-batch 2] [--steps 6] [--peak-tflops 989]
    python bench/mfu.py --smoke     # no GPU: a tiny shape on the CPU, checks the script runs (no MFU claim)

The language model has Qwen2.5-VL-7B's shape (hidden 3584, 28 query and 4 key/value heads of
128, SwiGLU 18944, vocabulary 152064, QKV bias, RMSNorm, mrope sections 16/24/24, untied output
layer) with `--layers` decoder layers instead of 28, random bf16 weights, and a one-block vision
tower (the batch is text only, so the tower does not run). The batch is `--batch` sequences of
`--seq` random tokens, every token but the first trained, `--micro-batch` sequences packed into
one row per micro-batch (default: the SFT job's `sft.micro_batch_size`, 2).

Both trainers take full optimizer steps (forward, backward, clip, Adam) through the code the jobs
run: `MegatronSFTTrainer.update` (megatron-core layers, DDP buffers with fp32 gradients, fp32
main weights) and the reference `SFTTrainer.update` (plain PyTorch on the HF model, AdamW on
the bf16 weights), one after the other, each from the same seeded random weights; the bench
stops if their first-step losses differ by more than 1%. Also measured in the same run: the
TFLOP/s of a bf16 8192³ matmul, the roofline MFU is also given against.

MFU = model FLOPs of a step / (median step time × peak). Model FLOPs count the matmuls only:
6 × tokens × (decoder matmul weights) + 6 × trained tokens × hidden × vocabulary (output layer)
+ 6 × layers × (heads × head_dim) × Σ seq² (causal attention: QKᵀ and PV over half the score
matrix, forward 2·S²·d, backward twice that). No embedding lookup, norm or elementwise work.
Peak: the H100 SXM's nominal dense bf16 rate, 989 TFLOP/s (`--peak-tflops` for other cards).

Last line: `RESULT {json}`; target `mfu_nominal` ≥ 0.40 on one H100.

Measured on one NVIDIA H100 80GB HBM3 (torch 2.11.0+cu130, megatron-core 0.16.1, no
TransformerEngine/apex), 4 × 4096 tokens, MFU of the 989 nominal:
- commit bfdc513 (one sequence per micro-batch, eager log-softmax): 4 layers 0.41 s per step,
  MFU 0.37–0.38, 1.03–1.04 × the reference's time; 8 layers 0.64 s, MFU 0.39.
- commit 4518358, packed rows on flash attention per sequence and the compiled
  log-probabilities (README "Trainer speed"): 4 layers, 2 sequences per micro-batch 0.379–0.381 s, MFU 0.400–0.403
  (0.54 of the measured matmul), 1.03 × the reference; 4 per micro-batch 0.368 s, MFU 0.415;
  1 per micro-batch 0.389 s, MFU 0.392; 8 layers, 1 per micro-batch 0.625 s, MFU 0.402
  (8 layers with 2 per micro-batch runs out of the 80 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

# Two trainers share one GPU in this process; expandable segments keep the allocator's
# fragmentation from the first from starving the second.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil  # noqa: E402

from deepeyes.config import SFTJobConfig  # noqa: E402
from deepeyes.model.pixels import PixelCache  # noqa: E402
from deepeyes.train.forward import TokenSequence  # noqa: E402
from deepeyes.train.megatron.sft import MegatronSFTTrainer  # noqa: E402
from deepeyes.train.setup import Policy  # noqa: E402
from deepeyes.train.sft import SFTTrainer  # noqa: E402

PAD_ID = 151643
SEVEN_B = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
               mrope_section=[16, 24, 24])
SMOKE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             mrope_section=[8, 12, 12])


def model_config(layers: int, shape: dict) -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=152064, hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
            num_hidden_layers=layers, num_attention_heads=shape["num_attention_heads"],
            num_key_value_heads=shape["num_key_value_heads"], max_position_embeddings=128000, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": shape["mrope_section"]},
            bos_token_id=151643, eos_token_id=151645, pad_token_id=PAD_ID,
        ),
        vision_config=dict(depth=1, out_hidden_size=shape["hidden_size"], fullatt_block_indexes=[0]),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=False,
    )


def step_flops(text, lengths: list[int]) -> float:
    """Model FLOPs of one training step (the formula in the module docstring)."""
    h, v, layers = text.hidden_size, text.vocab_size, text.num_hidden_layers
    head_dim = h // text.num_attention_heads
    q, kv = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    layer_weights = h * (q + 2 * kv) + q * h + 3 * h * text.intermediate_size
    tokens, trained = sum(lengths), sum(n - 1 for n in lengths)
    return 6 * tokens * layers * layer_weights + 6 * trained * h * v + 6 * layers * q * sum(n * n for n in lengths)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(device: torch.device, n: int, repeats: int = 20) -> float:
    """Median TFLOP/s of an n×n×n bf16 matmul on random data (the roofline)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(repeats + 3):
        sync(device)
        started = time.perf_counter()
        a @ b
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - started)
    return 2 * n**3 / statistics.median(times) / 1e12


def time_steps(name: str, update, batch, steps: int, device: torch.device) -> tuple[float, float, float]:
    """(first-step loss, median step seconds, peak GPU memory GB) of `steps` timed steps after two warm-ups."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, first_loss = [], None
    for i in range(steps + 2):
        sync(device)
        started = time.perf_counter()
        loss = update(batch)
        sync(device)
        elapsed = time.perf_counter() - started
        first_loss = loss if first_loss is None else first_loss
        if i >= 2:
            times.append(elapsed)
        print(f"{name} step {i}{' (warm-up)' if i < 2 else ''}: {elapsed:.3f} s, loss {loss:.4f}", flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return first_loss, statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=SFTJobConfig().sft.micro_batch_size,
                        help="sequences packed into one micro-batch row (default: the SFT job's)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="nominal dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--smoke", action="store_true", help="tiny shape; the only mode without CUDA")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        sys.exit("bench/mfu.py measures a GPU: no CUDA device here (`--smoke` runs a tiny shape on the CPU)")
    if args.smoke:
        args.layers, args.batch, args.seq, args.steps = 2, 2, 128, 1
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")

    peak_measured = matmul_tflops(device, 8192 if cuda else 512)
    print(f"bf16 matmul: {peak_measured:.3g} TFLOP/s measured, {args.peak_tflops:.0f} nominal", flush=True)

    config = model_config(args.layers, SMOKE if args.smoke else SEVEN_B)
    # Random tokens, no images: the processor only backs the (unused) pixel cache, and the
    # trainers need only the pad id of a tokenizer.
    pixels = PixelCache(Qwen2VLImageProcessorPil(), 3136, 262144)
    processor = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=PAD_ID))

    scratch = tempfile.TemporaryDirectory(prefix="mfu-")  # removed at exit
    checkpoint = Path(scratch.name)  # megatron ranks read their slices from the checkpoint's files

    def policy() -> Policy:
        """The model with the same random weights on every call (one at a time fits the GPU)."""
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
        model.model.visual.requires_grad_(False)  # frozen, as model.freeze_vision does
        if not (checkpoint / "config.json").exists():
            model.save_pretrained(checkpoint)
        return Policy(model, processor, pixels, checkpoint)

    generator = torch.Generator().manual_seed(0)
    batch = [TokenSequence(torch.randint(0, PAD_ID, (args.seq,), generator=generator).tolist(), [], [0] + [1] * (args.seq - 1))
             for _ in range(args.batch)]
    cfg = SFTJobConfig()
    cfg.trainer.backend = "megatron"
    cfg.sft.micro_batch_size = args.micro_batch
    cfg.optim.lr, cfg.optim.grad_clip = 1e-5, 1.0

    reference = SFTTrainer(cfg, policy())
    ref_loss, ref_s, ref_mem = time_steps("reference", lambda b: reference.update(b)["sft/loss"], batch, args.steps, device)
    del reference  # model, gradients and optimizer state
    if cuda:
        torch.cuda.empty_cache()
    megatron = MegatronSFTTrainer(cfg, policy())
    meg_loss, meg_s, meg_mem = time_steps("megatron", lambda b: megatron.update(b)["sft/loss"], batch, args.steps, device)
    model = megatron.policy.model

    if abs(meg_loss - ref_loss) > 0.01 * abs(ref_loss):
        sys.exit(f"first-step losses differ: megatron {meg_loss:.5f}, reference {ref_loss:.5f} (same weights and batch)")
    lengths = [len(s.ids) for s in batch]
    tokens, flops = sum(lengths), step_flops(config.text_config, lengths)
    params = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    embedding = model.model.language_model.embed_tokens.weight.numel()
    achieved = flops / meg_s / 1e12
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"device {name}; {args.layers} layers, {args.batch} x {args.seq} tokens, {args.micro_batch} sequences "
          f"per micro-batch; {flops / 1e12:.1f} TFLOP per step")
    print(f"megatron: {meg_s:.3f} s/step, {tokens / meg_s:.0f} tokens/s, {achieved:.0f} TFLOP/s, "
          f"MFU {achieved / args.peak_tflops:.3f} of nominal, {achieved / peak_measured:.3f} of measured matmul")
    print(f"reference: {ref_s:.3f} s/step, {tokens / ref_s:.0f} tokens/s; megatron/reference time {meg_s / ref_s:.3f}")
    print(f"first-step loss: megatron {meg_loss:.5f}, reference {ref_loss:.5f}")
    result = {
        "device": name, "layers": args.layers, "batch": args.batch, "seq": args.seq,
        "micro_batch": args.micro_batch, "steps": args.steps,
        "params_language": params, "params_nonembedding": params - embedding,
        "step_tflop": round(flops / 1e12, 2),
        "megatron_step_s": round(meg_s, 4), "megatron_tokens_per_s": round(tokens / meg_s),
        "megatron_tflops": round(achieved, 1),
        "mfu_nominal": round(achieved / args.peak_tflops, 4) if cuda else None,
        "mfu_vs_measured_matmul": round(achieved / peak_measured, 4),
        "nominal_peak_tflops": args.peak_tflops, "matmul_tflops": round(peak_measured, 1),
        "reference_step_s": round(ref_s, 4), "reference_tokens_per_s": round(tokens / ref_s),
        "megatron_over_reference": round(meg_s / ref_s, 3),
        "first_step_loss": {"megatron": round(meg_loss, 5), "reference": round(ref_loss, 5)},
        "peak_memory_gb": {"reference": round(ref_mem, 1), "megatron": round(meg_mem, 1)},
        "target_mfu": 0.4, "torch": torch.__version__,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
