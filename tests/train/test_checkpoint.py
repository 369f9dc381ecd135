"""A previous stage's result can be named by its checkpoint, its `latest` pointer or its run directory."""

from deepeyes.train.checkpoint import resolve_checkpoint


def test_a_checkpoint_is_found_from_its_pointer_or_its_run_directory(tmp_path):
    step = tmp_path / "checkpoints" / "step_000240"
    step.mkdir(parents=True)
    (step / "config.json").write_text("{}")
    (tmp_path / "checkpoints" / "latest").write_text("step_000240\n")
    for name in (step, tmp_path / "checkpoints" / "latest", tmp_path):
        assert resolve_checkpoint(name) == step
    assert resolve_checkpoint(tmp_path / "elsewhere") == tmp_path / "elsewhere"  # left for the loader's error
