"""megatron-core's internals (every parameter of every gradient bucket, its DDP and optimizer
configs) stay out of INFO logs, and come back when the engine's logger is at DEBUG."""

import pytest

from tests.megatron.workers import engine_logs

pytestmark = pytest.mark.slow


def test_megatron_bucket_listing_and_configs_only_at_debug(run_ranks):
    quiet = run_ranks(engine_logs, 1, False)
    assert not [r for r in quiet if r[1].startswith("megatron.core") and r[0] == "INFO"], quiet
    verbose = run_ranks(engine_logs, 1, True)
    messages = [message for level, name, message in verbose if name.startswith("megatron.core")]
    assert any(m.startswith("Number of buckets") or m.startswith("Params for bucket") for m in messages), messages
    assert any(m.startswith("Setting up optimizer with config") for m in messages), messages
