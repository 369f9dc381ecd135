"""The real local Slurm cluster (scripts/slurm_cluster.sh: munged, MariaDB + slurmdbd, slurmctld,
four slurmd with fake GPUs on loopback). Brought up on first use when this user can (root);
tests that need it are skipped, saying why, only when it cannot be brought up."""

import os
import subprocess

import pytest

from tests.paths import REPO

SCRIPT = REPO / "scripts" / "slurm_cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster():
    if subprocess.run(["bash", SCRIPT, "status"], capture_output=True).returncode == 0:
        return
    if os.geteuid() != 0:
        pytest.skip("no local Slurm cluster answers and bringing one up needs root (bash scripts/slurm_cluster.sh up)")
    result = subprocess.run(["bash", SCRIPT, "up"], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.skip(f"the local Slurm cluster could not be brought up: {result.stderr.strip()[-2000:]}")
