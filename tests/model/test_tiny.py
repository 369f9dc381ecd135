"""The tiny offline Qwen2.5-VL: deterministic, cached, safe to build from several processes."""

import hashlib
import subprocess
import sys

import pytest
import torch

from deepeyes.model import ensure_tiny_model
from deepeyes.cache import cache_root
from deepeyes.model.tiny import build_tiny_model


def weights_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_build_is_deterministic_and_saved_weights_are_the_built_ones(tiny_model):
    assert weights_hash(build_tiny_model()) == weights_hash(build_tiny_model()) == weights_hash(tiny_model)


def test_config_matches_the_real_interfaces(tiny_model, processor):
    config = tiny_model.config
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert text.num_key_value_heads < text.num_attention_heads  # GQA, as in the 7B
    assert text.vocab_size == 152064 and not config.tie_word_embeddings
    tokenizer = processor.tokenizer
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_config.out_hidden_size == text.hidden_size
    assert tiny_model.generation_config.eos_token_id == [151645, 151643]


def test_existing_directory_is_reused(tiny_model_dir):
    weights = tiny_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert ensure_tiny_model(tiny_model_dir.parent) == tiny_model_dir
    assert weights.stat().st_mtime_ns == before
    assert [p.name for p in tiny_model_dir.parent.iterdir()] == [tiny_model_dir.name]  # no staging left


def test_default_cache_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPEYES_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("DEEPEYES_CACHE")
    assert cache_root().parts[-2:] == (".cache", "deepeyes")


@pytest.mark.slow
def test_concurrent_builds_agree(tmp_path, tiny_model_dir):
    code = "import sys; from deepeyes.model import ensure_tiny_model; print(ensure_tiny_model(sys.argv[1]))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    paths = {proc.communicate(timeout=120)[0].strip() for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert len(paths) == 1
    built = paths.pop()
    assert [p.name for p in tmp_path.iterdir()] == [tiny_model_dir.name]
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (tmp_path / tiny_model_dir.name / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    assert built == str(tmp_path / tiny_model_dir.name)
