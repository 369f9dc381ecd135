"""One tiny model per test session, built into a private cache so the build itself is under test."""

from pathlib import Path

import pytest

from deepeyes.model import ensure_tiny_model, load_model, load_processor


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir)
