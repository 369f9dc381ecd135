#!/usr/bin/env bash
# The vllm backend on one GPU, end to end: vLLM loads the model (the tiny one, or MODEL=<checkpoint
# directory>), generates with our prompts (two images in the prompt, a tool image in a later turn),
# and the trainer's own forward (deepeyes.train.forward.token_logprobs, the HF model on the same
# GPU) scores the sampled tokens: their logprobs must agree with vLLM's, which they cannot if an
# image's tokens or positions were wrong. Then a file weight update (vLLM's pause/resume around the
# workers' load_weights) must change the served weights to the trainer's. Installs nothing: run it
# where `pip install -e '.[gpu]'` was run (README "On a GPU cluster"). Budget: about 3 minutes for
# the tiny model on one H100 (not yet run: the lent GPU machines have no vLLM and no way to bring it).
#   bash .device/gpu_check.sh            # prints RESULT {json}; exit 1 on a failed check
#   MODEL=/shared/models/Qwen2.5-VL-7B-Instruct DTYPE=bfloat16 bash .device/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DEEPEYES_CACHE="${DEEPEYES_CACHE:-${OUT:-/tmp}/deepeyes-cache}"
timeout 480 python3 - <<'PY'
import asyncio, json, os, sys, tempfile, time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deepeyes.agent.chat import ChatEncoder
from deepeyes.model import ensure_tiny_model, load_model, load_processor
from deepeyes.model.pixels import PixelCache
from deepeyes.rollout.api import GenerateRequest, SamplingParams
from deepeyes.rollout.vllm_engine import VLLMRolloutEngine
from deepeyes.rollout.weight_sync import publish_weights
from deepeyes.train.forward import TokenSequence, token_logprobs

started = time.perf_counter()
model_dir = Path(os.environ.get("MODEL") or ensure_tiny_model())
dtype = os.environ.get("DTYPE", "float32" if "MODEL" not in os.environ else "bfloat16")
MIN_PIXELS, MAX_PIXELS = 3136, 50176
scratch = Path(tempfile.mkdtemp())
images = []
for i, (h, w) in enumerate([(480, 640), (120, 900), (224, 224)]):
    images.append(scratch / f"image{i}.png")
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images[-1])

processor = load_processor(model_dir)
pixels = PixelCache(processor.image_processor, MIN_PIXELS, MAX_PIXELS)
encoder = ChatEncoder(processor.tokenizer, pixels.tokens)
first = encoder.prompt("You are a helpful assistant.", "<image>\n<image>\nDescribe both.", images[:2])
turn = encoder.text("<think>zoom</think><code>\n```python\nprint(1)\n```\n</code>")
second = first + turn + encoder.observation("Images:\n<image>", images[2:], model_closed_turn=False)
prompts = [(first, images[:2]), (second, images)]

engine = VLLMRolloutEngine.build(model_dir, dtype=dtype, max_model_len=4096, gpu_memory_utilization=0.5,
                                 max_batch=16, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
loaded_s = time.perf_counter() - started
hf = load_model(model_dir, dtype=getattr(torch, dtype)).cuda()
tolerance = 2e-3 if dtype == "float32" else 0.1


async def generate_all(seed: int):
    sampling = SamplingParams(max_new_tokens=32, temperature=1.0, seed=seed)
    return await asyncio.gather(*(engine.generate(GenerateRequest(ids, imgs, sampling)) for ids, imgs in prompts))


def max_logprob_gap(results) -> float:
    sequences = [TokenSequence(ids + r.token_ids, list(imgs), [0] * len(ids) + [1] * len(r.token_ids))
                 for (ids, imgs), r in zip(prompts, results)]
    with torch.no_grad():
        ours = token_logprobs(hf, pixels, sequences, processor.tokenizer.pad_token_id)
    return max(float((o.cpu() - torch.tensor(r.logprobs)).abs().max()) for o, r in zip(ours, results))


loop = asyncio.new_event_loop()
checks = {}
results = loop.run_until_complete(generate_all(seed=1))
checks["tokens"] = all(r.token_ids and len(r.logprobs) == len(r.token_ids) for r in results)
checks["finish_reasons"] = [r.finish_reason for r in results]
checks["logprob_gap"] = max_logprob_gap(results)

with torch.no_grad():
    for parameter in hf.parameters():
        parameter.add_(0.05 * torch.randn_like(parameter))
published = publish_weights(hf, scratch / "weights", version=1)
update_started = time.perf_counter()
loop.run_until_complete(engine.update_weights(published.path, 1))
checks["file_update_s"] = time.perf_counter() - update_started
results = loop.run_until_complete(generate_all(seed=2))
checks["weight_version"] = [r.weight_version for r in results]
checks["logprob_gap_after_update"] = max_logprob_gap(results)
loop.run_until_complete(engine.close())

ok = (checks["tokens"] and checks["logprob_gap"] < tolerance and checks["logprob_gap_after_update"] < tolerance
      and checks["weight_version"] == [1, 1])
print("RESULT " + json.dumps({"ok": ok, "model": str(model_dir), "dtype": dtype, "load_s": round(loaded_s, 1),
                              "total_s": round(time.perf_counter() - started, 1), **checks}))
sys.exit(0 if ok else 1)
PY
