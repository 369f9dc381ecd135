"""The services an RL job talks to, and how a local run starts them.

Under Slurm the launch plan starts every service and hands the trainer their URLs
(`DEEPEYES_SERVICES`, JSON `{role: [url, ...]}`) and the job's token file
(`DEEPEYES_TOKEN_FILE`). A local run (`python jobs/rl.py`) starts the same commands here as child
processes — rollout servers, the search service, the judge when enabled — and stops them when
the run ends, fails or is interrupted. Either way the trainer gets `ServiceEndpoints`.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from deepeyes.config import SERPAPI_KEY_VARIABLE, RLJobConfig
from deepeyes.service import (
    LocalService, free_port, local_services, new_token_file, python_module, read_token,
)

ROLLOUT, SEARCH, JUDGE = "rollout", "search", "judge"


@dataclass(frozen=True)
class ServiceEndpoints:
    urls: dict[str, list[str]]  # role name -> base URLs
    token: str

    def get(self, role: str) -> list[str]:
        return self.urls.get(role, [])


def rollout_server_command(cfg: RLJobConfig, model: Path, port: int, token_file: Path, weight_version: int,
                           threads: int) -> list[str]:
    # The most a request may ask for: a model turn (rollout limits) or a judge verdict.
    max_new_tokens = max(cfg.rollout.max_turn_tokens, cfg.reward.judge.max_new_tokens)
    return python_module(
        "deepeyes.rollout.server", "--backend", cfg.rollout.backend, "--model", model, "--port", port,
        "--token-file", token_file, "--weight-version", weight_version, "--dtype", cfg.model.dtype,
        "--max-batch", cfg.rollout.max_batch, "--batch-wait-ms", cfg.rollout.batch_wait_ms,
        "--threads", threads, "--min-pixels", cfg.model.min_pixels, "--max-pixels", cfg.model.max_pixels,
        "--pixel-cache-mb", cfg.model.pixel_cache_mb, "--max-new-tokens", max_new_tokens,
        "--weight-timeout-s", cfg.rollout.request_timeout_s,
    )


def search_service_command(cfg: RLJobConfig, corpus: Path | None, image_index: Path | None, records: Path,
                           cache_dir: Path, port: int, token_file: Path) -> list[str]:
    tools = cfg.tools
    argv = python_module(
        "deepeyes.tools.search_service", "--port", port, "--token-file", token_file,
        "--text-backend", tools.search_backend, "--image-backend", tools.image_search_backend,
        "--max-concurrency", tools.search_max_concurrency, "--timeout-s", tools.search_timeout_s,
        "--cache-dir", cache_dir,
    )
    optional = {
        "--corpus": corpus, "--image-index": image_index, "--mmsearch-cache": tools.search_cache,
        "--mmsearch-images": tools.search_cache_images, "--records": tools.search_cache_records or records,
        "--image-url-base": tools.serpapi_image_url_base,
    }
    return argv + [str(part) for flag, value in optional.items() if value for part in (flag, value)]


def search_secrets(tools) -> list[str]:
    """The secrets the search service uses: the SerpAPI key when a backend searches the web."""
    uses_serpapi = "serpapi" in (tools.search_backend, tools.image_search_backend)
    return [SERPAPI_KEY_VARIABLE] if uses_serpapi else []


@contextlib.contextmanager
def rl_services(
    cfg: RLJobConfig, out_dir: Path, policy_path: Path, weight_version: int, corpus: Path | None,
    image_index: Path | None, records: Path,
) -> Iterator[ServiceEndpoints | None]:
    """The job's services for the length of the block: those the launcher started (Slurm), else
    local child processes; None when `rollout.servers=0` (everything in the trainer's process)."""
    if "DEEPEYES_SERVICES" in os.environ:
        yield ServiceEndpoints(json.loads(os.environ["DEEPEYES_SERVICES"]), read_token(os.environ["DEEPEYES_TOKEN_FILE"]))
        return
    if cfg.rollout.servers == 0:
        yield None
        return
    service_dir = out_dir / "services"
    token_file = new_token_file(service_dir)
    token = read_token(token_file)

    def service(name: str, make_argv, secrets: list[str] = ()) -> LocalService:
        port = free_port()  # no service gets the trainer's secrets (wandb, API keys), only those it names
        return LocalService(name, make_argv(port), port, token, service_dir / f"{name}.log",
                            clean_environment=True, secrets=secrets)

    services = [
        service(f"{ROLLOUT}{i}", lambda port: rollout_server_command(
            cfg, policy_path, port, token_file, weight_version, cfg.rollout.server_threads))
        for i in range(cfg.rollout.servers)
    ]
    services.append(service(SEARCH, lambda port: search_service_command(
        cfg, corpus, image_index, records, service_dir / "search_cache", port, token_file), search_secrets(cfg.tools)))
    if cfg.reward.judge.enabled:
        judge_model = Path(cfg.reward.judge.model) if cfg.reward.judge.model else _tiny_model()
        services.append(service(JUDGE, lambda port: rollout_server_command(
            cfg, judge_model, port, token_file, 0, cfg.rollout.server_threads)))
    with local_services(services):
        urls: dict[str, list[str]] = {}
        for s in services:
            urls.setdefault(s.name.rstrip("0123456789"), []).append(s.url)
        yield ServiceEndpoints(urls, token)


def _tiny_model() -> Path:
    from deepeyes.model import ensure_tiny_model

    return ensure_tiny_model()
