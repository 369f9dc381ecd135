"""The GPU memory estimate (deepeyes.launch.memory) against what was measured, and the plan's
checks built on it: a paper-like config fits on 8 nodes x 8 GPUs, one that cannot is refused
before anything is queued."""

import dataclasses
import subprocess
import sys

import pytest
from transformers import Qwen2_5_VLConfig

from deepeyes.launch.memory import (
    GIB, KNOWN_SHAPES, TRAINER_RESERVE_GIB, ModelShape, TrainerLayout, model_shape, rollout_memory, trainer_memory,
)
from deepeyes.launch.plan import build_plan, max_trajectory_tokens
from tests.launch.test_plan import job_config
from tests.paths import REPO

H100_GIB = 80


def mfu_bench_shape(tmp_path, layers: int) -> ModelShape:
    """bench/mfu.py's model (the 7B language model with fewer layers, a one-block vision tower
    with transformers' default widths), through a config.json as a checkpoint carries it."""
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers,
                         num_attention_heads=28, num_key_value_heads=4,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=1, out_hidden_size=3584, fullatt_block_indexes=[0]),
        tie_word_embeddings=False,
    )
    config.save_pretrained(tmp_path)
    return model_shape("unused", tmp_path)


def mfu_bench_estimate(tmp_path, layers: int, sequences_per_micro_batch: int) -> float:
    """GiB the formula gives for a bench/mfu.py run: bf16, TP=1, no recompute, 4096-token
    sequences packed into one row per micro-batch; the bench also keeps the HF model it built
    the trainer from on the GPU (its bf16 language model; the vision tower is shared)."""
    shape = mfu_bench_shape(tmp_path, layers)
    layout = TrainerLayout(tensor=1, pipeline=1, data=1, sequence_parallel=False, distributed_optimizer=False,
                           recompute=False, tokens=4096 * sequences_per_micro_batch, dtype="bfloat16")
    return trainer_memory(shape, layout).total + 2 * shape.language_parameters / GIB


def test_shapes_count_the_parameters_transformers_builds(tiny_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    tiny = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_dir))
    assert model_shape("tiny", tiny_dir).parameters == tiny.num_parameters()
    # Qwen2.5-VL-7B-Instruct: 8,292,166,656 parameters, 676,550,144 of them in the vision tower.
    assert KNOWN_SHAPES["qwen2_5_vl_7b"].parameters == 8_292_166_656
    assert KNOWN_SHAPES["qwen2_5_vl_7b"].vision.parameters == 676_550_144
    assert KNOWN_SHAPES["qwen2_5_vl_32b"].parameters == pytest.approx(33.45e9, rel=0.01)


def test_the_estimate_matches_the_mfu_bench_measured_on_an_h100(tmp_path):
    # README "Trainer speed", one H100 80GB, commit 4518358: 4 layers, 2 sequences per micro-batch,
    # torch.cuda.max_memory_allocated 56.2 GiB (60.8 before the log-softmax was compiled).
    four = mfu_bench_estimate(tmp_path, layers=4, sequences_per_micro_batch=2)
    assert four == pytest.approx(56.2, rel=0.03)
    # 8 layers ran with 1 sequence per micro-batch and ran out of the 80 GB with 2: the plan's
    # check (estimate + reserve within the GPU) says the same.
    assert mfu_bench_estimate(tmp_path, layers=8, sequences_per_micro_batch=1) + TRAINER_RESERVE_GIB < H100_GIB
    assert mfu_bench_estimate(tmp_path, layers=8, sequences_per_micro_batch=2) + TRAINER_RESERVE_GIB > H100_GIB


def test_parallelism_recompute_and_the_distributed_optimizer_shrink_a_rank():
    seven = KNOWN_SHAPES["qwen2_5_vl_7b"]
    base = TrainerLayout(tensor=1, pipeline=1, data=32, sequence_parallel=False, distributed_optimizer=False,
                         recompute=False, tokens=2 * 17742, dtype="bfloat16")
    alone = trainer_memory(seven, base)
    # 18 bytes a parameter before any activation: the issue's ~137 GB for 7B's language model.
    assert alone.weights + alone.gradients + alone.optimizer == pytest.approx(18 * seven.language_parameters / GIB)
    sharded = trainer_memory(seven, dataclasses.replace(base, distributed_optimizer=True))
    assert sharded.optimizer == pytest.approx(alone.optimizer / 32)
    tp4 = trainer_memory(seven, dataclasses.replace(base, tensor=4, data=8))
    assert tp4.weights == pytest.approx(alone.weights / 4) and tp4.output < alone.output / 3
    recompute = trainer_memory(seven, dataclasses.replace(base, recompute=True))
    assert recompute.activations == pytest.approx(alone.activations_other)
    assert recompute.activations < alone.activations / 10 and recompute.activations_other == alone.activations
    pp2 = trainer_memory(seven, dataclasses.replace(base, pipeline=2, data=16))
    assert pp2.weights < alone.weights * 0.6


def test_a_rollout_gpu_holds_the_weights_and_the_kv_cache_of_whole_sequences():
    seven = KNOWN_SHAPES["qwen2_5_vl_7b"]
    one = rollout_memory(seven, tensor_parallel=1, dtype="bfloat16", gpu_gib=80, utilization=0.85, max_model_len=17742)
    assert one.weights == pytest.approx(seven.parameters * 2 / GIB)
    # 28 layers x 4 KV heads x 128 x 2 (K, V) x 2 bytes = 56 KiB a token
    assert one.kv_per_sequence == pytest.approx(17742 * 57344 / GIB)
    assert one.sequences == int((0.85 * 80 - one.weights - one.workspace) // one.kv_per_sequence)
    two = rollout_memory(seven, tensor_parallel=2, dtype="bfloat16", gpu_gib=80, utilization=0.85, max_model_len=17742)
    assert two.sequences > 2 * one.sequences


PAPER_7B_RL = [
    "cluster=slurm", "nodes=8", "cluster.trainer_nodes=4", "model=qwen2_5_vl_7b", "model.path=/nonexistent/7b",
    "rollout=vllm", "rollout.tensor_parallel=1", "rollout.max_response_tokens=16384", "grpo.prompts_per_step=256",
    "rollout.n=16", "grpo.micro_batch_size=1", "trainer=megatron", "trainer.tensor_parallel=4",
    "trainer.distributed_optimizer=true", "trainer.recompute=true", "trainer.sequence_parallel=true",
]


def test_a_paper_like_7b_config_on_8_nodes_fits_and_a_plain_one_is_refused_naming_the_keys(tmp_path):
    plan = build_plan("rl", job_config(*PAPER_7B_RL), tmp_path)
    trainer = plan.roles_on(0)[0]
    assert trainer.name == "trainer" and trainer.world_size == 32
    total = float(trainer.gpu_memory.split("GiB")[0].lstrip("~"))
    assert 20 < total < H100_GIB - TRAINER_RESERVE_GIB
    engines = [r for r in plan.roles if r.name == "rollout"]
    assert len(engines) == 4 * 8 and all(len(r.gpus) == 1 for r in engines)
    assert "sequences of 22757 tokens at once" in engines[0].gpu_memory

    plain = [*PAPER_7B_RL, "trainer.tensor_parallel=1", "trainer.sequence_parallel=false", "trainer.distributed_optimizer=false"]
    with pytest.raises(ValueError, match="the trainer does not fit its GPUs") as refused:
        build_plan("rl", job_config(*plain), tmp_path)
    for named in ("cluster.gpu_memory_gb=80", "trainer.tensor_parallel=1", "trainer.distributed_optimizer=False",
                  "trainer.recompute=True", "grpo.micro_batch_size=1 x 22757 tokens"):
        assert named in str(refused.value)


def test_a_rollout_engine_that_cannot_hold_one_sequence_is_refused(tmp_path):
    cfg = [*PAPER_7B_RL, "rollout.gpu_memory_utilization=0.2"]
    with pytest.raises(ValueError, match=r"the rollout engine does not fit its GPUs.*rollout.gpu_memory_utilization=0.2"):
        build_plan("rl", job_config(*cfg), tmp_path)


def test_max_model_len_and_the_engine_flags_come_from_the_rollout_limits(tmp_path):
    cfg = job_config(*PAPER_7B_RL, "rollout.tensor_parallel=2", "rollout.gpu_memory_utilization=0.9")
    plan = build_plan("rl", cfg, tmp_path)
    command = next(r for r in plan.roles if r.name == "rollout").command
    assert max_trajectory_tokens(cfg) == 1024 + 4194304 // 784 + 16384  # text, every image of the trajectory, response
    flags = dict(zip(command, command[1:]))
    assert flags["--tensor-parallel"] == "2" and flags["--gpu-memory-utilization"] == "0.9"
    assert flags["--max-model-len"] == str(max_trajectory_tokens(cfg))


def test_the_dry_run_of_a_paper_like_config_prints_the_memory_per_gpu(tmp_path):
    result = subprocess.run(
        [sys.executable, "jobs/rl.py", *PAPER_7B_RL, "cluster.dry_run=true", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plan = result.stdout.split("# sbatch script")[0]  # the script repeats the plan as comments
    lines = [line for line in plan.splitlines() if "GPU memory per GPU" in line]
    assert len(lines) == 4 + 32  # the trainer of each of the 4 trainer nodes (per rank) and every rollout engine
    assert "weights" in lines[0] and "optimizer" in lines[0] and "with" in lines[0] and "recompute" in lines[0]
    assert "KV cache" in lines[-1] and "the step's 4096 trajectories are ~128 per engine" in lines[-1]
