"""A run that restarts from scratch or from an older checkpoint in the same run directory does
not trip over the weight versions an earlier attempt published past it (issue 20: a sweep member
restarted from step 0 found v1 and v2 and pruned the v0 it had just written)."""

import torch

from deepeyes.rollout.weight_sync import publish_weights
from deepeyes.train.rl import clear_weights_after


def test_a_restart_clears_the_versions_past_its_checkpoint_before_publishing(tmp_path):
    root = tmp_path / "weights"
    model = torch.nn.Linear(2, 2)
    for version in (0, 1, 2):
        publish_weights(model, root, version)  # the earlier attempt: v1 and v2 kept, v0 pruned
    (root / "weights_v000003.partial").write_bytes(b"cut short by the preemption")
    clear_weights_after(root, 1)  # resumed from the step-1 checkpoint
    assert sorted(p.name for p in root.iterdir()) == ["weights_v000001.safetensors"]
    clear_weights_after(root, 0)  # or from scratch
    published = publish_weights(model, root, 0)
    assert published.path.exists() and sorted(p.name for p in root.iterdir()) == ["weights_v000000.safetensors"]
