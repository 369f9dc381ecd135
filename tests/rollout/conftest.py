"""Real rollout servers on loopback, started the way a job starts them."""

import pytest

from deepeyes.service import LocalService, free_port, local_services, new_token_file, python_module, read_token


def rollout_server(name, model_dir, token_file, log_dir, *extra):
    port = free_port()
    argv = python_module(
        "deepeyes.rollout.server", "--backend", "hf", "--model", model_dir, "--port", port,
        "--token-file", token_file, "--threads", 1, "--batch-wait-ms", 20, *extra,
    )
    return LocalService(name, argv, port, read_token(token_file), log_dir / f"{name}.log")


@pytest.fixture(scope="session")
def token_file(tmp_path_factory):
    return new_token_file(tmp_path_factory.mktemp("token"))


@pytest.fixture(scope="module")
def two_servers(tiny_dir, token_file, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    services = [rollout_server(f"rollout{i}", tiny_dir, token_file, logs) for i in range(2)]
    with local_services(services, ready_timeout_s=120):
        yield services
