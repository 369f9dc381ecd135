"""The rollout server: one HTTP API in front of a generation backend (`hf` or `vllm`).

    python -m deepeyes.rollout.server --backend hf --model PATH --port P --token-file F \
        [--host 127.0.0.1] [--weights PUBLISHED.safetensors --weight-version K] [--threads 1] \
        [--max-new-tokens N]

Endpoints (every one needs the job's token, see `deepeyes.service`):

    POST /generate  {input_ids, images: [path], sampling: {max_new_tokens, temperature, top_p,
                     stop, seed}, session, min_weight_version}
                 -> {token_ids, logprobs, finish_reason, weight_version}
                    every field range-checked first (ids within the vocabulary, seed in [0, 2**63),
                    finite sampling parameters, max_new_tokens within --max-new-tokens): a bad
                    request is a 400 naming the field and never joins a batch with others
                    409 when this server's weights are older than min_weight_version
                    503 while loading, or after a weight update failed midway (until the next one)
    POST /weights   {version, path}  -> {version, seconds}   (load published weights, generation paused)
    POST /weights/init     {master_address, master_port, rank_offset, world_size, group, packed}
                 -> {group}   join the trainer's weight-broadcast group (see deepeyes.rollout.weight_sync)
    POST /weights/pause    {version, packed} -> {paused}   pause generation for a broadcast (held until
                 /weights/receive or /weights/resume, at most --weight-timeout-s)
    POST /weights/receive  {version, names, dtype_names, shapes, packed}
                 -> {version, seconds}   receive the paused-for version, then resume generation
    POST /weights/resume   -> {resumed}   the trainer abandoned the paused-for version
    GET  /weights/digest   -> {weight_version, sha256}   (hf backend: to check a sync bit for bit)
    POST /v1/chat/completions   OpenAI chat completions, text and data-URL images (hf backend;
                 see deepeyes.rollout.openai_api): a local teacher for `jobs/synthesize.py`
    GET  /info      backend, model, weight_version, weight_group, weight_ranks, weights_paused_for,
                    requests served
    GET  /health, /ready

Every error is a JSON object `{"error": message}`; an engine failure on a request is a 500 with
`"kind": "engine"`, so `RolloutClient` can tell a request's own failure from a server that is
down. A judge is the same server serving the judge model. `RolloutClient` is the only code that
speaks this wire format.
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
from deepeyes.rollout.api import BadRequest, RequestLimits, request_from_json, result_to_json
from deepeyes.rollout.openai_api import chat_completion_json, chat_request_from_json, error_json

log = logging.getLogger("deepeyes.rollout.server")


def build_hf_engine(args: argparse.Namespace):
    """transformers generation: on the GPU in bfloat16 when there is one (`--dtype auto`), else on
    the CPU in float32; the same code either way."""
    import torch

    from deepeyes.config import ModelConfig
    from deepeyes.rollout.hf_engine import HFRolloutEngine
    from deepeyes.train.setup import load_policy

    torch.set_num_threads(args.threads)  # one thread per server process is fastest when processes share cores
    cuda = torch.cuda.is_available()
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if cuda else "float32")
    policy = load_policy(
        ModelConfig(dtype=dtype, min_pixels=args.min_pixels, max_pixels=args.max_pixels, freeze_vision=False,
                    pixel_cache_mb=args.pixel_cache_mb),
        str(args.model),
    )
    model = policy.model.to("cuda") if cuda else policy.model
    return HFRolloutEngine(model, policy.tokenizer, policy.pixels, args.max_batch, args.batch_wait_ms,
                           weight_timeout_s=args.weight_timeout_s)


def build_vllm_engine(args: argparse.Namespace):
    from deepeyes.rollout.vllm_engine import VLLMRolloutEngine

    return VLLMRolloutEngine.build(
        args.model, dtype=args.dtype, tensor_parallel=args.tensor_parallel, max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization, max_batch=args.max_batch, min_pixels=args.min_pixels,
        max_pixels=args.max_pixels, weight_timeout_s=args.weight_timeout_s,
    )


BACKENDS = {"hf": build_hf_engine, "vllm": build_vllm_engine}


class RolloutServer:
    """Routes HTTP requests to an engine; the engine is built after the port is open, so
    /health answers during a long model load and /ready turns 200 when it is done."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.engine = None
        self.limits: RequestLimits | None = None
        self.requests_served = 0
        self.weight_group: str | None = None  # the trainer's broadcast group this server is in
        self._paused_for: int | None = None  # the weight version generation is paused for (/weights/pause)
        self._pause_lease: asyncio.TimerHandle | None = None  # resumes a pause the trainer never followed up
        self.chat_images = Path(tempfile.mkdtemp(prefix="deepeyes-chat-images-"))  # data-URL images, by content hash
        self.app = service_app(read_token(args.token_file), ready=lambda: self.engine is not None)
        self.app.middlewares.append(_errors_as_json)
        self.app.router.add_post("/generate", self.generate)
        self.app.router.add_post("/weights", self.update_weights)
        self.app.router.add_post("/weights/init", self.init_weight_transfer)
        self.app.router.add_post("/weights/pause", self.pause_for_weights)
        self.app.router.add_post("/weights/receive", self.receive_weights)
        self.app.router.add_post("/weights/resume", self.resume_generation)
        self.app.router.add_get("/weights/digest", self.weights_digest)
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
            self.limits = RequestLimits(vocab_size=engine.vocab_size, max_new_tokens=self.args.max_new_tokens,
                                        max_input_tokens=self.args.max_input_tokens)
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
            generate_request, min_version = request_from_json(await request.json(), self.limits)
        except (BadRequest, JSONDecodeError) as error:
            return error_response(400, f"bad /generate request: {error}")
        if self.engine.weight_version < 0:
            return error_response(503, "weights incomplete: a weight update failed midway; waiting for the next one")
        if self.engine.weight_version < min_version:
            return error_response(409, f"weights at version {self.engine.weight_version}, request needs ≥ {min_version}")
        try:
            result = await self.engine.generate(generate_request)
        except Exception as error:
            log.exception("the engine failed on a request")
            return web.json_response({"error": f"engine error: {type(error).__name__}: {error}", "kind": "engine"},
                                     status=500)
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
        body = await _json_object(request)
        if not isinstance(body.get("version"), int) or not isinstance(body.get("path"), str):
            return error_response(400, "bad /weights request: expected {version: int, path: str}")
        path = Path(body["path"])
        if not path.is_file():
            return error_response(400, f"published weights {path} do not exist on this server's filesystem")
        started = time.perf_counter()
        await self.engine.update_weights(path, body["version"])
        seconds = time.perf_counter() - started
        log.info("loaded weight version %d from %s in %.2fs", body["version"], path, seconds)
        return web.json_response({"version": self.engine.weight_version, "seconds": seconds})

    async def init_weight_transfer(self, request: web.Request) -> web.Response:
        if self.engine is None:
            return error_response(503, "model still loading")
        body = await _json_object(request)
        fields = {"master_address": str, "master_port": int, "rank_offset": int, "world_size": int, "group": str,
                  "packed": bool}
        wrong = [name for name, kind in fields.items() if not isinstance(body.get(name), kind)]
        if wrong or not 0 < body["rank_offset"] < body["world_size"]:
            return error_response(400, f"bad /weights/init request: fields {wrong or ['rank_offset']} "
                                       f"(expected {', '.join(fields)}, 0 < rank_offset < world_size)")
        self.weight_group = None
        started = time.perf_counter()
        join = (body["master_address"], body["master_port"], body["rank_offset"], body["world_size"], body["packed"])
        try:  # it blocks until every rank has joined: off the event loop
            await asyncio.to_thread(self.engine.init_weight_transfer, *join)
        except Exception as error:
            log.exception("could not join the weight-broadcast group")
            return web.json_response({"error": f"joining the weight group failed: {error}", "kind": "weights"}, status=500)
        self.weight_group = body["group"]
        log.info("joined weight-broadcast group %s as rank %d of %d at %s:%d (packed=%s) in %.2fs", body["group"][:8],
                 body["rank_offset"], body["world_size"], body["master_address"], body["master_port"], body["packed"],
                 time.perf_counter() - started)
        return web.json_response({"group": self.weight_group})

    async def pause_for_weights(self, request: web.Request) -> web.Response:
        """Phase 1 of a broadcast: check the update can be taken, pause generation, and say so. The
        trainer broadcasts only once every member has answered (see `deepeyes.rollout.weight_sync`).
        The pause is held until /weights/receive or /weights/resume, or the weight timeout."""
        if self.engine is None:
            return error_response(503, "model still loading")
        body = await _json_object(request)
        if not isinstance(body.get("version"), int) or not isinstance(body.get("packed"), bool):
            return error_response(400, "bad /weights/pause request: expected {version: int, packed: bool}")
        if self._paused_for is not None:
            return error_response(409, f"generation is already paused for weight version {self._paused_for}")
        try:
            self.engine.check_weight_update(body["packed"])
        except (RuntimeError, ValueError) as error:
            return web.json_response({"error": str(error), "kind": "weights"}, status=409)
        started = time.perf_counter()
        self._paused_for = body["version"]  # claimed now: a second pause is refused while this one waits
        try:  # bounded by the engine (--weight-timeout-s), which undoes a pause it could not finish
            await self.engine.pause_generation()
        except Exception as error:
            self._paused_for = None
            log.error("could not pause generation for weight version %d: %s", body["version"], error)
            return web.json_response({"error": f"pausing generation failed: {type(error).__name__}: {error}",
                                      "kind": "weights"}, status=500)
        self._pause_lease = asyncio.get_running_loop().call_later(
            self.args.weight_timeout_s, lambda: asyncio.ensure_future(self._resume_after_weights("the trainer went quiet")))
        log.info("paused generation for weight version %d in %.2fs", body["version"], time.perf_counter() - started)
        return web.json_response({"paused": body["version"]})

    async def receive_weights(self, request: web.Request) -> web.Response:
        """Phase 2: receive the broadcast version (generation paused by phase 1), then resume."""
        if self.engine is None:
            return error_response(503, "model still loading")
        body = await _json_object(request)
        names, dtype_names, shapes = body.get("names"), body.get("dtype_names"), body.get("shapes")
        if (not isinstance(body.get("version"), int) or not isinstance(body.get("packed"), bool)
                or not all(isinstance(x, list) for x in (names, dtype_names, shapes))
                or not len(names) == len(dtype_names) == len(shapes)):
            return error_response(400, "bad /weights/receive request: expected {version: int, names, dtype_names, "
                                       "shapes: lists of one length, packed: bool}")
        if self._paused_for != body["version"] or self._pause_lease is None:  # paused, and confirmed so
            return error_response(409, f"/weights/receive of version {body['version']} without /weights/pause "
                                       f"(paused for: {self._paused_for})")
        self._pause_lease.cancel()  # held until this receive ends
        started = time.perf_counter()
        try:  # bounded: vLLM's NCCL receive itself waits for the trainer without a timeout
            await asyncio.wait_for(self.engine.receive_weights(body["version"], names, dtype_names, shapes,
                                                               body["packed"]), self.args.weight_timeout_s)
        except Exception as error:
            self.weight_group = None  # the engine reports version -1 if the weights may be mixed
            log.error("receiving weight version %d failed: %s: %s", body["version"], type(error).__name__, error)
            return web.json_response({"error": f"receiving weight version {body['version']} failed: "
                                               f"{type(error).__name__}: {error}", "kind": "weights"}, status=500)
        finally:
            await self._resume_after_weights()
        seconds = time.perf_counter() - started
        log.info("received weight version %d (%d tensors) in %.2fs", body["version"], len(names), seconds)
        return web.json_response({"version": self.engine.weight_version, "seconds": seconds})

    async def resume_generation(self, request: web.Request) -> web.Response:
        """The trainer abandoned a paused version (another member failed to pause): serve again."""
        resumed = self._paused_for
        await self._resume_after_weights("the trainer abandoned it")
        return web.json_response({"resumed": resumed})

    async def _resume_after_weights(self, why: str | None = None) -> None:
        if self._paused_for is None:
            return
        if why:
            log.warning("resuming generation paused for weight version %d: %s", self._paused_for, why)
        self._paused_for = None
        if self._pause_lease is not None:
            self._pause_lease.cancel()
            self._pause_lease = None
        try:  # bounded: a vLLM engine wedged in a collective answers nothing
            await asyncio.wait_for(self.engine.resume_generation(), self.args.weight_timeout_s)
        except Exception:
            log.exception("could not resume generation after a weight update")

    async def weights_digest(self, request: web.Request) -> web.Response:
        if self.engine is None:
            return error_response(503, "model still loading")
        if not hasattr(self.engine, "weights_digest"):
            return error_response(501, f"weight digests need the hf backend, not {self.args.backend}")
        digest = await asyncio.to_thread(self.engine.weights_digest)
        return web.json_response({"weight_version": self.engine.weight_version, "sha256": digest})

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response({
            "backend": self.args.backend, "model": str(self.args.model), "ready": self.engine is not None,
            "weight_version": None if self.engine is None else self.engine.weight_version,
            "weight_group": self.weight_group, "weights_paused_for": self._paused_for,
            "weight_ranks": None if self.engine is None else self.engine.weight_transfer_ranks,
            "requests_served": self.requests_served,
        })


@web.middleware
async def _errors_as_json(request: web.Request, handler):
    """Any failure a handler did not answer itself is a JSON 500 too, never aiohttp's text page."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return error_response(error.status, error.reason)
    except Exception as error:
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": f"{type(error).__name__}: {error}", "kind": "server"}, status=500)


async def _json_object(request: web.Request) -> dict:
    try:
        body = await request.json()
    except JSONDecodeError as error:
        raise web.HTTPBadRequest(reason=f"body is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(reason="body must be a JSON object")
    return body


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="hf")
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--weights", type=Path, help="published weights to load over the checkpoint at start")
    parser.add_argument("--weight-version", type=int, default=0, help="the version the served weights are")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="auto: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (hf backend)")
    parser.add_argument("--min-pixels", type=int, default=3136)
    parser.add_argument("--max-pixels", type=int, default=50176)
    parser.add_argument("--pixel-cache-mb", type=int, default=256, help="processed images kept for reuse (hf backend)")
    parser.add_argument("--max-new-tokens", type=int, default=1024,
                        help="the most new tokens one /generate request may ask for (the rollout limits)")
    parser.add_argument("--max-input-tokens", type=int, default=1 << 17, help="the longest prompt /generate takes")
    parser.add_argument("--weight-timeout-s", type=float, default=600.0,
                        help="how long a weight-broadcast step may wait on the trainer before it fails")
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
