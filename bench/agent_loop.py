"""Step time of the async agent loop against a per-turn-barrier loop, with heavy-tailed tool latency.

    python bench/agent_loop.py [--prompts 8] [--n 4] [--turns 4] [--generate-ms 40] [--seed 0]
    python bench/agent_loop.py --smoke     # a tiny shape: checks the script runs

A scripted policy server (a real HTTP server in its own process, the rollout wire format, reached
through `RolloutClient`) answers every turn after `--generate-ms` with a code call, and the last
turn with an answer. Each tool call takes a latency drawn from a Pareto distribution (alpha 1.5,
median ≈ 80 ms, capped at 3 s: most cells are quick, a few are very slow), fixed per (trajectory,
call) by the seed, so both loops face exactly the same latencies.

- async:   `deepeyes.agent.loop.rollout`: one coroutine per trajectory, no barrier.
- barrier: what DeepEyesV2's rollout does: every turn, generate for all live trajectories, then
           run all their tool calls and wait for the slowest before the next turn.
- slowest: the trajectory with the largest total tool latency, run alone through the async loop:
           the floor for any loop.

Last line: `RESULT {json}`; target `async_over_slowest` ≤ 1.15.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web

from deepeyes.agent import protocol
from deepeyes.agent.chat import ChatEncoder
from deepeyes.agent.loop import EpisodeLimits, episode_seed, rollout
from deepeyes.agent.tool_session import Observation
from deepeyes.agent.trajectory import ToolCall, Trajectory
from deepeyes.data import ensure_sample_data, read_records
from deepeyes.service import (
    LocalService, free_port, local_services, new_token_file, read_token, service_app,
)
from deepeyes.model import ensure_tiny_model, load_processor
from deepeyes.model.pixels import PixelCache
from deepeyes.rollout.api import GenerateRequest, SamplingParams, request_from_json
from deepeyes.rollout.client import RolloutClient

CODE_TURN = "<think>Let me look closer.</think>\n<code>\n```python\nprint(image_1.size)\n```\n</code>"
ANSWER_TURN = "<think>Done.</think>\n<answer>5</answer>"


# ---- the scripted policy server (runs in its own process: `--serve PORT TOKEN_FILE TURNS MS`) ----


def serve(port: int, token_file: Path, turns: int, generate_ms: float) -> None:
    tokenizer = load_processor(ensure_tiny_model()).tokenizer
    assistant = tokenizer("<|im_start|>assistant", add_special_tokens=False)["input_ids"]
    code_ids = tokenizer(CODE_TURN, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(ANSWER_TURN, add_special_tokens=False)["input_ids"] + [
        tokenizer.convert_tokens_to_ids("<|im_end|>")]

    async def generate(request: web.Request) -> web.Response:
        body, _ = request_from_json(await request.json())
        ids = body.input_ids
        turn = sum(ids[i : i + len(assistant)] == assistant for i in range(len(ids))) - 1  # turns taken so far
        await asyncio.sleep(generate_ms / 1000)
        last = turn >= turns - 1
        tokens = answer_ids if last else code_ids
        return web.json_response({"token_ids": tokens, "logprobs": [-0.1] * len(tokens),
                                  "finish_reason": "eos" if last else "stop", "weight_version": 0})

    app = service_app(read_token(token_file))
    app.router.add_post("/generate", generate)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# ---- tools with scripted latency -------------------------------------------------------------


class ScriptedTools:
    """A toolbox whose code calls take a seeded heavy-tailed time and return a fixed output."""

    def __init__(self, seed: int):
        self.seed = seed

    def stored(self, record):
        return record  # no image store: the records' own files stand for the stored copies

    def latency(self, name: str, call: int) -> float:
        rng = random.Random(f"{self.seed}/{name}/{call}")
        return min(0.05 * rng.paretovariate(1.5), 3.0)

    def session(self, name: str, images: list[Path], variant: str = protocol.DEEPEYESV2) -> "ScriptedSession":
        return ScriptedSession(self, name)


class ScriptedSession:
    def __init__(self, tools: ScriptedTools, name: str):
        self.tools, self.name, self.calls = tools, name, 0

    async def execute(self, action: protocol.Action) -> Observation:
        seconds = self.tools.latency(self.name, self.calls)
        self.calls += 1
        await asyncio.sleep(seconds)  # the scripted tool's run time: the quantity under test
        text = protocol.render_code_observation("(224, 224)\n", "", 0)
        return Observation(text, [], ToolCall(protocol.CODE, True, seconds))

    async def close(self) -> None:
        pass


# ---- the per-turn-barrier loop (the baseline) ------------------------------------------------


async def barrier_rollout(records, n, seed, engine, encoder, tools, limits) -> list[Trajectory]:
    """Each turn: generate for every live trajectory, then run every tool call, then wait for all."""
    trajectories, sessions = [], []
    for group, record in enumerate(records):
        for sample in range(n):
            images = list(record.images)
            prompt = encoder.prompt(protocol.SYSTEM_PROMPT, protocol.user_prompt(record.question), images)
            trajectories.append(Trajectory(record=record, group=group, prompt_ids=prompt, images=images))
            sessions.append(tools.session(f"step0-g{group}-s{sample}", images))
    live = list(range(len(trajectories)))
    for turn in range(limits.max_turns):
        requests = [
            GenerateRequest(trajectories[i].input_ids, list(trajectories[i].images), SamplingParams(
                limits.max_turn_tokens, seed=episode_seed(seed, 0, trajectories[i].group, i % n, turn)))
            for i in live
        ]
        results = await asyncio.gather(*(engine.generate(r) for r in requests))
        acting = []
        for i, result in zip(live, results):
            trajectories[i].extend(result.token_ids, trained=True, logprobs=result.logprobs)
            action = protocol.parse_action(encoder.decode(result.token_ids))
            if not isinstance(action, protocol.Answer):
                acting.append((i, action, result))
        observations = await asyncio.gather(*(sessions[i].execute(action) for i, action, _ in acting))
        for (i, _, result), observation in zip(acting, observations):
            trajectories[i].extend(encoder.observation(observation.text, [], model_closed_turn=False), trained=False)
        live = [i for i, _, _ in acting]
        if not live:
            break
    return trajectories


# ---- the measurement -------------------------------------------------------------------------


async def timed(make_coroutine) -> float:
    started = time.perf_counter()
    await make_coroutine()
    return time.perf_counter() - started


async def measure(args, url: str, token: str) -> dict:
    processor = load_processor(ensure_tiny_model())
    encoder = ChatEncoder(processor.tokenizer, PixelCache(processor.image_processor, 3136, 50176).tokens)
    records = read_records(ensure_sample_data(n_per_family=4, seed=0).rl_train)[: args.prompts]
    tools = ScriptedTools(args.seed)
    limits = EpisodeLimits(max_turns=args.turns, max_turn_tokens=64, max_response_tokens=100_000)
    engine = RolloutClient([url], token)
    tool_time = {
        (g, s): sum(tools.latency(f"step0-g{g}-s{s}", c) for c in range(args.turns - 1))
        for g in range(len(records)) for s in range(args.n)
    }
    slowest_group, slowest_sample = max(tool_time, key=tool_time.get)

    class Alone(ScriptedTools):  # the slowest trajectory keeps its own latencies when run by itself
        def latency(self, name, call):
            return tools.latency(f"step0-g{slowest_group}-s{slowest_sample}", call)

    try:
        results = {"async_s": [], "barrier_s": [], "slowest_s": []}
        for _ in range(args.repeats):  # interleaved, so load from other processes hits all alike
            results["async_s"].append(await timed(
                lambda: rollout(records, args.n, 0, args.seed, engine, encoder, tools, limits, progress=False)))
            results["barrier_s"].append(await timed(
                lambda: barrier_rollout(records, args.n, args.seed, engine, encoder, tools, limits)))
            results["slowest_s"].append(await timed(
                lambda: rollout([records[slowest_group]], 1, 0, args.seed, engine, encoder, Alone(args.seed), limits,
                                progress=False)))
    finally:
        await engine.close()
    best = {key: min(values) for key, values in results.items()}
    return {
        "trajectories": len(records) * args.n, "turns": args.turns, "generate_ms": args.generate_ms,
        "slowest_tool_s": round(max(tool_time.values()), 3),
        "median_tool_s": round(sorted(tool_time.values())[len(tool_time) // 2], 3),
        **{key: round(value, 3) for key, value in best.items()},
        "async_over_slowest": round(best["async_s"] / best["slowest_s"], 3),
        "barrier_over_slowest": round(best["barrier_s"] / best["slowest_s"], 3),
        "barrier_over_async": round(best["barrier_s"] / best["async_s"], 3),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        port, token_file, turns, generate_ms = sys.argv[2:6]
        serve(int(port), Path(token_file), int(turns), float(generate_ms))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--generate-ms", type=float, default=40.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="2 prompts x 2 rollouts, 2 turns, one repeat")
    args = parser.parse_args()
    if args.smoke:
        args.prompts, args.n, args.turns, args.repeats = 2, 2, 2, 1
    with tempfile.TemporaryDirectory() as scratch:
        token_file = new_token_file(Path(scratch))
        port = free_port()
        argv = [sys.executable, __file__, "--serve", str(port), str(token_file), str(args.turns), str(args.generate_ms)]
        server = LocalService("scripted-policy", argv, port, read_token(token_file), Path(scratch) / "server.log")
        with local_services([server], ready_timeout_s=120):
            result = asyncio.run(measure(args, server.url, server.token))
    for key, value in result.items():
        print(f"{key:>22}: {value}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
