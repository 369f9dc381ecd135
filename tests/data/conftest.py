import pytest

from deepeyes.data import generate_sample_data

# Six tasks per family cover every (attribute, variant) pair of the lookup family.
N_PER_FAMILY = 6


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    return generate_sample_data(tmp_path_factory.mktemp("sample"), n_per_family=N_PER_FAMILY, seed=0)
