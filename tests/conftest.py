"""Session-wide fixtures: the tiny model and the sample data, built once into the cache
(`DEEPEYES_CACHE`, which .ci/run points inside the checkout)."""

import pytest

from deepeyes.data import ensure_sample_data
from deepeyes.model import ensure_tiny_model, load_processor


@pytest.fixture(scope="session")
def tiny_dir():
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    return load_processor(tiny_dir).tokenizer


@pytest.fixture(scope="session")
def sample_data():
    return ensure_sample_data(n_per_family=4, seed=0)
