"""The rollout server: one HTTP API in front of a generation backend (`hf` or `vllm`).

    python -m deepeyes.rollout.server --backend hf --model PATH --port P --token-file F \
        [--host 127.0.0.1] [--weights PUBLISHED.safetensors --weight-version K] [--threads 1]

Endpoints (every one needs the job's token, see `deepeyes.service`):

    POST /generate  {input_ids, images: [path], sampling: {max_new_tokens, temperature, top_p,
                     stop, seed}, min_weight_version}
                 -> {token_ids, logprobs, finish_reason, weight_version}
                    409 when this server's weights are older than min_weight_version
    POST /weights   {version, path}  -> {version, seconds}   (load published weights between batches)
    POST /v1/chat/completions   OpenAI chat completions, text and data-URL images (hf backend;
                 see deepeyes.rollout.openai_api): a local teacher for `jobs/synthesize.py`
    GET  /info      backend, model, weight_version, requests served
    GET  /health, /ready

A judge is the same server serving the judge model. `RolloutClient` is the only code that speaks
this wire format.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import tempfile
import time
from json import JSONDecodeError
from pathlib import Path

from aiohttp import web

from deepeyes.agent.chat import ChatEncoder
from deepeyes.service import add_service_args, error_response, read_token, serve, service_app
from deepeyes.rollout.api import BadRequest, request_from_json, result_to_json
from deepeyes.rollout.openai_api import chat_completion_json, chat_request_from_json, error_json

log = logging.getLogger("deepeyes.rollout.server")


def build_hf_engine(args: argparse.Namespace):
    import torch

    from deepeyes.config import ModelConfig
    from deepeyes.rollout.hf_engine import HFRolloutEngine
    from deepeyes.train.setup import load_policy

    torch.set_num_threads(args.threads)  # one thread per server process is fastest when processes share cores
    policy = load_policy(
        ModelConfig(dtype=args.dtype, min_pixels=args.min_pixels, max_pixels=args.max_pixels, freeze_vision=False,
                    pixel_cache_mb=args.pixel_cache_mb),
        str(args.model),
    )
    return HFRolloutEngine(policy.model, policy.tokenizer, policy.pixels, args.max_batch, args.batch_wait_ms)


def build_vllm_engine(args: argparse.Namespace):
    from deepeyes.rollout.vllm_engine import VLLMRolloutEngine

    return VLLMRolloutEngine.build(
        args.model, dtype=args.dtype, tensor_parallel=args.tensor_parallel, max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization, max_batch=args.max_batch, min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
    )


BACKENDS = {"hf": build_hf_engine, "vllm": build_vllm_engine}


class RolloutServer:
    """Routes HTTP requests to an engine; the engine is built after the port is open, so
    /health answers during a long model load and /ready turns 200 when it is done."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.engine = None
        self.requests_served = 0
        self.chat_images = Path(tempfile.mkdtemp(prefix="deepeyes-chat-images-"))  # data-URL images, by content hash
        self.app = service_app(read_token(args.token_file), ready=lambda: self.engine is not None)
        self.app.router.add_post("/generate", self.generate)
        self.app.router.add_post("/weights", self.update_weights)
        self.app.router.add_post("/v1/chat/completions", self.chat_completions)
        self.app.router.add_get("/info", self.info)
        self.app.on_startup.append(self._start_loading)
        self.app.on_cleanup.append(self._close)

    async def _start_loading(self, app: web.Application) -> None:
        self._loading = asyncio.create_task(self._load())

    async def _load(self) -> None:
        try:
            engine = await asyncio.to_thread(BACKENDS[self.args.backend], self.args)
            engine.weight_version = self.args.weight_version
            if self.args.weights:
                await engine.update_weights(self.args.weights, self.args.weight_version)
            self.engine = engine
            log.info("serving %s with backend %s at weight version %d", self.args.model, self.args.backend,
                     engine.weight_version)
        except Exception:
            log.exception("could not load the model; exiting")
            logging.shutdown()
            os._exit(1)  # the launcher sees the exit; the log says why

    async def _close(self, app: web.Application) -> None:
        shutil.rmtree(self.chat_images, ignore_errors=True)
        if self.engine is not None:
            await self.engine.close()

    async def generate(self, request: web.Request) -> web.Response:
        if self.engine is None:
            return error_response(503, "model still loading")
        try:
            generate_request, min_version = request_from_json(await request.json())
        except (BadRequest, JSONDecodeError) as error:
            return error_response(400, f"bad /generate request: {error}")
        if self.engine.weight_version < min_version:
            return error_response(409, f"weights at version {self.engine.weight_version}, request needs ≥ {min_version}")
        result = await self.engine.generate(generate_request)
        self.requests_served += 1
        return web.json_response(result_to_json(result))

    async def chat_completions(self, request: web.Request) -> web.Response:
        if self.engine is None:
            return web.json_response(error_json("model still loading"), status=503)
        if not hasattr(self.engine, "pixels"):  # the vllm backend: vLLM ships its own OpenAI server
            return web.json_response(error_json(f"chat completions need the hf backend, not {self.args.backend}"),
                                     status=501)
        encoder = ChatEncoder(self.engine.tokenizer, self.engine.pixels.tokens)
        try:
            body = await request.json()
            generate_request = await asyncio.to_thread(chat_request_from_json, body, encoder, self.chat_images)
        except (BadRequest, JSONDecodeError) as error:
            return web.json_response(error_json(f"bad /v1/chat/completions request: {error}"), status=400)
        result = await self.engine.generate(generate_request)
        self.requests_served += 1
        model = body.get("model") or str(self.args.model)
        return web.json_response(chat_completion_json(generate_request, result, encoder, model))

    async def update_weights(self, request: web.Request) -> web.Response:
        if self.engine is None:
            return error_response(503, "model still loading")
        body = await request.json()
        if not isinstance(body, dict) or not isinstance(body.get("version"), int) or not isinstance(body.get("path"), str):
            return error_response(400, "bad /weights request: expected {version: int, path: str}")
        path = Path(body["path"])
        if not path.is_file():
            return error_response(400, f"published weights {path} do not exist on this server's filesystem")
        started = time.perf_counter()
        await self.engine.update_weights(path, body["version"])
        seconds = time.perf_counter() - started
        log.info("loaded weight version %d from %s in %.2fs", body["version"], path, seconds)
        return web.json_response({"version": self.engine.weight_version, "seconds": seconds})

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response({
            "backend": self.args.backend, "model": str(self.args.model), "ready": self.engine is not None,
            "weight_version": None if self.engine is None else self.engine.weight_version,
            "requests_served": self.requests_served,
        })


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="hf")
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--weights", type=Path, help="published weights to load over the checkpoint at start")
    parser.add_argument("--weight-version", type=int, default=0, help="the version the served weights are")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (hf backend)")
    parser.add_argument("--min-pixels", type=int, default=3136)
    parser.add_argument("--max-pixels", type=int, default=50176)
    parser.add_argument("--pixel-cache-mb", type=int, default=256, help="processed images kept for reuse (hf backend)")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="GPUs of the vLLM engine (vllm backend)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="vLLM context length: prompt + rollout.max_response_tokens "
                             "(vllm_engine.rollout_max_model_len; default: the model's own; vllm backend)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                        help="fraction of each GPU the vLLM engine may take (vllm backend)")
    add_service_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    serve(RolloutServer(args).app, args)


if __name__ == "__main__":
    main()
