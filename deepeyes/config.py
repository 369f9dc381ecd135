"""Typed configuration for every job, registered with Hydra's ConfigStore.

The YAML files under conf/ only choose values; these dataclasses say which keys exist and what
type they have, so a typo or a wrong type fails when the config is composed — on the login node,
before a Slurm queue wait — not hours later inside a job.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from deepeyes.cache import cache_root

log = logging.getLogger(__name__)


@dataclass
class RoleConfig:
    """A service the launch plan starts next to the built-in roles (see deepeyes.launch.plan)."""

    name: str = ""
    command: list[str] = field(default_factory=list)  # "{host}", "{port}", "{token_file}" are filled in on the node
    every_node: bool = True  # False: only on the first node
    ready: bool = True  # wait for GET /ready = 200 before the trainer starts


@dataclass
class ClusterConfig:
    name: str = "local"  # where the job's roles run: "local" (this machine) | "slurm"
    nodes: int = 1  # the top-level `nodes=N` sets this
    gpus_per_node: int = 0
    # Memory of one GPU in GiB (nvidia-smi's figure: an H100 80GB has 80); the plan refuses a
    # trainer rank or rollout engine whose estimate does not fit (deepeyes.launch.memory).
    gpu_memory_gb: float = 80.0
    cpus_per_node: int = 0  # 0 = Slurm's default
    mem_gb: int = 0  # per node; 0 = all of the node's memory
    # The first nodes run trainer ranks (one per GPU; several nodes need trainer=megatron);
    # 0 = one node for RL, every node for SFT.
    trainer_nodes: int = 0
    # Nodes that run rollout servers instead of training; -1 = all but the trainer nodes.
    rollout_nodes: int = -1
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time_min: int = 60
    sbatch_extra: dict[str, str] = field(default_factory=dict)  # more #SBATCH options, e.g. {exclusive: ""}
    container_image: Optional[str] = None  # an Apptainer image every role runs in
    container_binds: list[str] = field(default_factory=list)  # its bind mounts (apptainer --bind), e.g. [/shared]
    # Each job's ports lie in [port_base, port_base + 12000), its span chosen by the job id. Keep
    # them below the ephemeral range (Linux: from 32768): a /ready probe of a port there that is
    # not listening yet can connect to itself and read back its own request.
    port_base: int = 20000
    ready_timeout_s: float = 300.0  # a role not ready by then fails the job
    signal_delay_s: int = 90  # Slurm warns (SIGUSR2) this long before the time limit
    max_requeues: int = 3  # preemptions / time-outs after which the job is not requeued again
    wait: bool = False  # stay attached until the Slurm job ends and report its result
    dry_run: bool = False  # print the plan and the sbatch script, submit nothing
    extra_roles: list[RoleConfig] = field(default_factory=list)


@dataclass
class ModelConfig:
    name: str = "tiny"
    # A Hugging Face checkpoint directory (Qwen2.5-VL layout). None = the tiny model this
    # project builds offline into the cache on first use.
    path: Optional[str] = None
    dtype: str = "float32"
    # Pixel budget per image (the processor resizes into [min_pixels, max_pixels]).
    min_pixels: int = 3136
    max_pixels: int = 50176
    # Pixel budget per trajectory, all its images together (prompt + tool results, after
    # resizing): images a tool returns past it are not shown (counted in tools/images_dropped);
    # a prompt over it is an error. 0 = no limit but the token budget.
    max_trajectory_pixels: int = 802816
    # Processed images (vision inputs) a process keeps for reuse, least recently used out first.
    pixel_cache_mb: int = 256
    # The paper freezes the vision tower and the projector (merger) during training.
    freeze_vision: bool = True
    threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default
    # The tiny model only (path None): start from its cold start, SFT on the learning recipe built
    # once into the cache (deepeyes.train.cold_start), instead of random weights.
    cold_start: bool = False


@dataclass
class SourceConfig:
    """One source of a data mixture: a record file and its weight (share of the samples drawn)."""

    name: str = ""  # logged as data/mix/<name>
    path: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    name: str = "sample"
    # JSON-lines files in deepeyes.data.schema form. None = the bundled sample data, generated
    # deterministically into the cache on first use.
    train: Optional[str] = None
    test: Optional[str] = None
    sft: Optional[str] = None
    corpus: Optional[str] = None
    image_index: Optional[str] = None
    sample_per_family: int = 32
    sample_seed: int = 0
    # The bundled sample data only (deepeyes.data.sample_tasks): "learning" = perception questions
    # about colors that the cold-start code measures and prints (the learning recipe); and per
    # family, the share of cold-start trajectories that answer without a tool (on purpose).
    sample_recipe: str = "default"
    sample_no_tool: dict[str, float] = field(default_factory=dict)
    on_bad_record: str = "raise"  # "raise" | "skip" (counted and logged)
    # False (the paper presets): a file the job needs that is unset or lies in the bundled sample
    # data is an error, so a paper-sized run never trains on the toy tasks by accident.
    allow_sample: bool = True
    # Mixtures (deepeyes.train.sampler.MixtureSampler): each sample comes from a source drawn with
    # probability weight / total weight; set, they replace `train` (RL) or `sft` (SFT). The
    # realized mix of every step is logged.
    train_mix: list[SourceConfig] = field(default_factory=list)
    sft_mix: list[SourceConfig] = field(default_factory=list)


@dataclass
class RolloutConfig:
    backend: str = "hf"
    n: int = 4  # rollouts per prompt: the GRPO group size
    temperature: float = 1.0
    top_p: float = 1.0
    max_turn_tokens: int = 96  # new tokens per model turn
    max_response_tokens: int = 512  # model + observation tokens after the prompt
    max_turns: int = 3
    max_batch: int = 16  # requests one batched generate serves
    batch_wait_ms: float = 5.0  # how long the batcher waits for more requests to join
    # Rollout server processes a local run starts (deepeyes.rollout.server); 0 = generate in the
    # trainer's process (the reference path). Under Slurm the launch plan places the servers.
    servers: int = 1
    server_threads: int = 1  # torch threads per server process
    # GPUs per rollout engine (vLLM tensor parallelism); a rollout node runs gpus_per_node / this engines.
    tensor_parallel: int = 1
    # Fraction of each rollout GPU's memory the vLLM engine may take (weights, activations, KV cache).
    gpu_memory_utilization: float = 0.85
    # How new weights reach the rollout engines after each step: "file" (a safetensors file on the
    # shared filesystem, loaded by every server) | "broadcast" (torch.distributed from the trainer's leader).
    weight_sync: str = "file"
    # Rollouts may come from weights this many optimizer steps old; 0 = strictly on-policy.
    max_staleness: int = 0
    request_timeout_s: float = 600.0


@dataclass
class ProtocolConfig:
    """How the agent loop answers what the model writes, and which reward scores it (deepeyes.agent.protocol).

    "deepeyesv2": the released RL environment and reward, rule for rule: a released checkpoint
    sees token for token what it saw in training. An invalid action ends the episode, and the
    reward of the record's family is the released one (LLM judge for perception and search).
    "feedback": an invalid action is answered "Format Error." and the episode goes on, the first
    <answer> counts, and the reward is 0.8 * accuracy + 0.2 * format for every family: a small
    model that breaks the protocol learns what it did wrong instead of losing the episode.
    """

    variant: str = "deepeyesv2"


@dataclass
class CodeToolConfig:
    """The code sandbox (deepeyes.tools.sandbox_daemon): limits per session, and where it runs."""

    timeout_s: float = 20.0
    memory_mb: int = 1024  # the whole session (cgroup) and each of its processes (address space)
    max_processes: int = 64
    cpus: float = 1.0  # CPU share of a session (cgroup quota)
    scratch_mb: int = 256  # the session's /scratch tmpfs
    cpu_s: int = 30
    # "namespaces": each session in its own user/mount/network/pid namespaces (the daemon refuses
    # to start where they are unavailable); "none": no isolation, for trusted code only.
    isolation: str = "namespaces"
    max_sessions: int = 64  # per node; more trajectories wait for a free session
    idle_timeout_s: float = 600.0  # a session unused this long is closed
    # The daemons already running, one per node (the launcher fills them in and spreads the
    # sessions over all); empty = the job starts its own.
    urls: list[str] = field(default_factory=list)
    token_file: Optional[str] = None


@dataclass
class ToolsConfig:
    code: CodeToolConfig = field(default_factory=CodeToolConfig)
    search_backend: str = "local"  # text search: local (BM25 over data.corpus) | serpapi
    image_search_backend: str = "local"  # local (data.image_index) | serpapi | mmsearch_cache
    search_top_k: int = 5
    search_timeout_s: float = 20.0
    search_max_concurrency: int = 16
    # mmsearch_cache: the MMSearch-R1 cache JSON, the folder of its images and the RL records
    # whose extra_info.index its sample ids are (None = data.train).
    search_cache: Optional[str] = None
    search_cache_images: Optional[str] = None
    search_cache_records: Optional[str] = None
    serpapi_image_url_base: Optional[str] = None  # serpapi image search: public URL prefix of query images


@dataclass
class JudgeConfig:
    """An LLM judge grading answers (a rollout server serving the judge model), with the
    rule-based accuracy as the counted fallback when it is slow or down."""

    enabled: bool = False
    model: Optional[str] = None  # a Hugging Face checkpoint directory; None = the tiny model
    timeout_s: float = 30.0
    # The released judge reasons in <think> before its \boxed{Yes}/\boxed{No}; it was allowed 8192.
    max_new_tokens: int = 8192
    # GPUs of the judge's engine (vLLM tensor parallelism), the last ones of the last serving node;
    # None = rollout.tensor_parallel. The release's Qwen2.5-72B-Instruct needs 4 of 80 GB.
    tensor_parallel: Optional[int] = None


@dataclass
class RewardConfig:
    accuracy_weight: float = 0.8
    format_weight: float = 0.2
    judge: JudgeConfig = field(default_factory=JudgeConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    # Linear warmup over warmup_steps, or over warmup_ratio of the run's steps (rounded up, as
    # transformers does; the release's SFT warms up over 0.1): one or the other, not both.
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    # After warmup: "constant" (the paper's RL) or "cosine" down to 0 at the run's last step, so a
    # short high-lr run ends on settled weights rather than wherever its last noisy step left them.
    schedule: str = "constant"


@dataclass
class GRPOConfig:
    prompts_per_step: int = 4
    steps: int = 3
    mini_batch_size: int = 0  # trajectories per optimizer step; 0 = the whole batch (one step)
    micro_batch_size: int = 2  # trajectories per forward/backward
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28


@dataclass
class SFTConfig:
    epochs: int = 1
    batch_size: int = 4
    micro_batch_size: int = 2
    cutoff_len: int = 2048  # tokens; longer samples are dropped and counted
    max_steps: int = 0  # 0 = run all epochs


@dataclass
class LoggerConfig:
    backend: str = "wandb"
    mode: str = "offline"  # "online" | "offline" | "disabled"
    project: str = "deepeyes"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    # RL: a table of sample trajectories (question image, model turns with their tool calls, tool
    # output and images, answer, reward) at the first step and every `table_every` steps; 0 = never.
    table_every: int = 10
    table_rows: int = 8


@dataclass
class RunConfig:
    seed: int = 0
    out_dir: str = "."  # Hydra sets the working directory per run; checkpoints/ and wandb/ go here
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    # Checkpoints kept: the newest N, older ones deleted after each save (the one `latest` names
    # and the one the run resumed from stay until a newer one is complete); 0 = keep all.
    keep_checkpoints: int = 0
    init_from: Optional[str] = None  # a checkpoint directory to start from (e.g. the SFT result)


@dataclass
class TrainerConfig:
    """Which trainer runs the updates, and how a Megatron one is split over ranks."""

    backend: str = "hf"  # "hf": plain PyTorch on the HF model (the reference) | "megatron": megatron-core
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int = 1  # model chunks per pipeline rank (interleaved 1F1B when > 1)
    sequence_parallel: bool = False
    recompute: bool = False  # full activation recompute of every layer
    distributed_optimizer: bool = False  # optimizer state sharded over data-parallel ranks


@dataclass
class JobConfig:
    """What every job that loads a model has: where it runs, the model, its data, its run directory."""

    nodes: int = 1  # shorthand for cluster.nodes
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass
class AgentJobConfig(JobConfig):
    """A job that runs the agent loop (RL, the difficulty filter, evaluation)."""

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


@dataclass
class RLJobConfig(AgentJobConfig):
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class SFTJobConfig(JobConfig):
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))
    sft: SFTConfig = field(default_factory=SFTConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class BenchmarkConfig:
    name: str = "sample"
    # Layout of the file (deepeyes.eval.benchmarks): records | realx | vstar | hrbench |
    # mme_realworld | mathverse | mmsearch.
    format: str = "records"
    path: Optional[str] = None  # None = the bundled sample test split (format=records only)
    image_root: Optional[str] = None  # relative image paths resolve here; None = the file's directory
    tools: bool = True  # False: the model gets one turn and must answer without tool calls
    limit: int = 0  # the first N questions; 0 = all
    on_bad_record: str = "raise"  # "raise" | "skip" (counted and logged)


@dataclass
class EvalConfig:
    n: int = 1  # samples per question; accuracy is the mean over all of them
    temperature: float = 0.0  # 0 = greedy (then n > 1 repeats the same answer)
    questions_per_batch: int = 64  # questions whose rollouts run together (bounds memory and sandboxes)
    grader: str = "rule"  # "rule" = deepeyes.reward.accuracy (normalized match + math-verify)
    table_rows: int = 16  # sample trajectories logged to the wandb table
    # An RL run directory: its metrics.jsonl is plotted as plots/training_curves.png (response
    # length, reward and tool calls per trajectory over steps).
    training_run: Optional[str] = None


@dataclass
class EvalJobConfig(AgentJobConfig):
    ckpt: Optional[str] = None  # a checkpoint directory to evaluate; None = model.path / the tiny model
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class FilterConfig:
    input: Optional[str] = None  # Record file to filter; None = data.train
    k: int = 8  # rollouts per question
    max_passes: int = 2  # keep questions solved in at most this many of the k rollouts
    prompts_per_batch: int = 16  # questions whose k rollouts run together
    limit: int = 0  # the first N questions; 0 = all


@dataclass
class FilterJobConfig(AgentJobConfig):
    ckpt: Optional[str] = None  # the base model to filter with; None = model.path / the tiny model
    filter: FilterConfig = field(default_factory=FilterConfig)


@dataclass
class PrepareDataConfig:
    out_dir: Optional[str] = None  # where the converted files go; None = the run directory
    sft: list[str] = field(default_factory=list)  # LLaMA-Factory sharegpt JSON files
    sft_image_root: Optional[str] = None  # the folder their `images` paths are relative to
    rl: list[str] = field(default_factory=list)  # verl parquet files, concatenated
    rl_image_root: Optional[str] = None  # for image paths in the parquet; None = each file's folder
    search_cache: Optional[str] = None  # MMSearch-R1 image-search cache JSON (needs rl)
    search_cache_images: Optional[str] = None  # the folder its cached_images_path are relative to
    sft_family: str = "deepeyesv2"
    on_bad_record: str = "raise"  # "raise" | "skip" (counted and logged)


@dataclass
class PrepareDataJobConfig:
    prepare: PrepareDataConfig = field(default_factory=PrepareDataConfig)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass
class TeacherConfig:
    """The policy of `jobs/synthesize.py`: a model behind an OpenAI-compatible chat-completions
    endpoint (deepeyes.synth.teacher)."""

    name: str = "local"
    # The endpoint, e.g. http://node12:8000/v1 (a vLLM server) or a commercial API. None = the job
    # serves `checkpoint` itself with a local rollout server (its /v1/chat/completions).
    base_url: Optional[str] = None
    model: str = "teacher"  # the model name the endpoint expects
    checkpoint: Optional[str] = None  # base_url=None only: the checkpoint to serve; None = the tiny model
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable that holds the key (never the key itself)
    timeout_s: float = 300.0  # per request
    max_retries: int = 5  # per request: rate limits (429), server errors, timeouts, lost connections
    backoff_s: float = 2.0  # wait before the first retry; doubles per retry (jittered, Retry-After honoured)
    max_backoff_s: float = 60.0
    requests_per_minute: float = 0.0  # request starts are spaced 60/rpm seconds apart; 0 = no limit
    max_concurrency: int = 16  # requests in flight


@dataclass
class SynthConfig:
    input: Optional[str] = None  # Record file of questions; None = data.train
    k: int = 4  # attempts per question
    grader: str = "rule"  # "rule" = deepeyes.reward.accuracy | "judge" = the teacher endpoint, rule as fallback
    require_tool: bool = False  # keep only trajectories with at least one tool call that ran without error
    concurrency: int = 16  # trajectories in flight (each may hold a sandbox session)
    attempts_per_batch: int = 256  # tool-returned images are cleared between batches (kept ones are copied out)
    limit: int = 0  # the first N questions; 0 = all


@dataclass
class SynthJobConfig(AgentJobConfig):
    """`model` is the student: its tokenizer and pixel budget measure the turn and response limits."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    # A chat-completions teacher cannot continue the "<think>" the released environment opens
    # after each observation: synthesis speaks the feedback variant (the same text protocol).
    protocol: ProtocolConfig = field(default_factory=lambda: ProtocolConfig(variant="feedback"))


# A preset marks a key the user must set (a path, the run's length) as `${required:}`: a `???` in a
# preset cannot do it, as OmegaConf keeps the value it merges `???` onto (the group's `null`).
REQUIRED = "${required:}"


def _required(*, _node_) -> None:
    raise MissingMandatoryValue(f"config {_node_._get_full_key(None)} is required: set it on the command line")


def _required_keys(node: Any, prefix: str = "") -> list[str]:
    """The dotted keys of a config container (unresolved) still holding REQUIRED."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return [prefix] if node == REQUIRED else []
    return [key for name, value in items for key in _required_keys(value, f"{prefix}.{name}" if prefix else str(name))]


def register_configs() -> None:
    """Make the schemas available to conf/*.yaml as `rl_schema`, `sft_schema`, `eval_schema`,
    `filter_schema`, `prepare_data_schema` and `synthesize_schema`, and the `required` mark."""
    OmegaConf.register_new_resolver("required", _required, replace=True)
    store = ConfigStore.instance()
    store.store(name="rl_schema", node=RLJobConfig)
    store.store(name="sft_schema", node=SFTJobConfig)
    store.store(name="eval_schema", node=EvalJobConfig)
    store.store(name="filter_schema", node=FilterJobConfig)
    store.store(name="prepare_data_schema", node=PrepareDataJobConfig)
    store.store(name="synthesize_schema", node=SynthJobConfig)


# The data groups of the bundled generated tasks (conf/data/): toy data for the tiny model only.
BUNDLED_DATA = ("sample", "learning")

_CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "optim.schedule": ("constant", "cosine"),
    "data.on_bad_record": ("raise", "skip"),
    "data.sample_recipe": ("default", "learning"),
    "rollout.backend": ("hf", "vllm"),
    "rollout.weight_sync": ("file", "broadcast"),
    "protocol.variant": ("deepeyesv2", "feedback"),
    "tools.code.isolation": ("namespaces", "none"),
    "tools.search_backend": ("local", "serpapi"),
    "tools.image_search_backend": ("local", "serpapi", "mmsearch_cache"),
    "logger.mode": ("online", "offline", "disabled"),
    "benchmark.format": ("records", "realx", "vstar", "hrbench", "mme_realworld", "mathverse", "mmsearch"),
    "benchmark.on_bad_record": ("raise", "skip"),
    "eval.grader": ("rule",),
    "synth.grader": ("rule", "judge"),
    "prepare.on_bad_record": ("raise", "skip"),
    "cluster.name": ("local", "slurm"),
    "trainer.backend": ("hf", "megatron"),
}


def to_object(cfg: DictConfig) -> Any:
    """The composed config as its dataclass, after checks a type alone cannot express."""
    # The preset's required keys first: listing `???` ones resolves the config, which stops at the first.
    missing = _required_keys(OmegaConf.to_container(cfg, resolve=False)) or sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise MissingMandatoryValue(
            f"config needs {', '.join(missing)} (the preset requires them): set each on the command line, "
            f"e.g. {missing[0]}=<value>"
        )
    job = OmegaConf.to_object(cfg)
    model = getattr(job, "model", None)
    if model is not None and model.path is None and model.name != "tiny":
        raise MissingMandatoryValue(
            f"model={model.name} needs model.path=<local checkpoint directory> (nothing is downloaded at run time)"
        )
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value not in allowed:
            raise ValueError(f"config {key}={value!r}: expected one of {', '.join(allowed)}")
    _check_positive(cfg)
    if isinstance(job, SynthJobConfig) and job.protocol.variant != "feedback":
        raise ValueError(
            f"config protocol.variant={job.protocol.variant!r}: synthesis needs 'feedback' (a chat-completions "
            "teacher cannot continue the <think> the released environment writes after each observation)"
        )
    if isinstance(job, RLJobConfig) and job.rollout.n < 2:
        # A group of one has advantage 0 (its reward minus its own mean): the step would learn nothing.
        raise ValueError(f"config rollout.n={job.rollout.n}: GRPO needs at least 2 rollouts per prompt (its group)")
    data = getattr(job, "data", None)
    if data is not None:
        _check_mixture("data.train_mix", data.train_mix, data.train, "data.train")
        _check_mixture("data.sft_mix", data.sft_mix, data.sft, "data.sft")
    benchmark = getattr(job, "benchmark", None)
    if benchmark is not None and benchmark.path is None and benchmark.format != "records":
        raise ValueError(f"benchmark={benchmark.name} needs benchmark.path=<its {benchmark.format} file>")
    trainer = getattr(job, "trainer", None)
    if trainer is not None:
        _check_trainer(trainer)
    optim = getattr(job, "optim", None)
    if optim is not None:
        _check_warmup(optim)
    if isinstance(job, RLJobConfig):
        _check_serpapi_key(job)
    if data is not None and not data.allow_sample:
        _refuse_sample_data(job)
    elif isinstance(job, (RLJobConfig, SFTJobConfig)) and job.model.name != "tiny" and data.name in BUNDLED_DATA:
        log.warning("model=%s trains on the bundled toy data (data=%s) with the small default recipe; the paper's "
                    "recipe is +experiment=deepeyesv2_<size>_sft / deepeyesv2_<size>_rl", job.model.name, data.name)
    return job


def _check_trainer(trainer: TrainerConfig) -> None:
    for key in ("tensor_parallel", "pipeline_parallel", "virtual_pipeline"):
        if getattr(trainer, key) < 1:
            raise ValueError(f"config trainer.{key}={getattr(trainer, key)}: must be >= 1")
    if trainer.backend == "hf":  # one process on the HF model: the megatron settings would be silently ignored
        megatron_only = {
            "tensor_parallel": trainer.tensor_parallel > 1, "pipeline_parallel": trainer.pipeline_parallel > 1,
            "virtual_pipeline": trainer.virtual_pipeline > 1, "sequence_parallel": trainer.sequence_parallel,
            "recompute": trainer.recompute, "distributed_optimizer": trainer.distributed_optimizer,
        }
        for key, is_set in megatron_only.items():
            if is_set:
                raise ValueError(f"config trainer.{key}={getattr(trainer, key)} needs trainer=megatron (trainer=hf is one process)")
    if trainer.sequence_parallel and trainer.tensor_parallel == 1:
        raise ValueError("config trainer.sequence_parallel=true needs trainer.tensor_parallel > 1")
    if trainer.virtual_pipeline > 1 and trainer.pipeline_parallel == 1:
        raise ValueError(f"config trainer.virtual_pipeline={trainer.virtual_pipeline} needs trainer.pipeline_parallel > 1")


def _check_warmup(optim: OptimConfig) -> None:
    if optim.warmup_steps < 0:
        raise ValueError(f"config optim.warmup_steps={optim.warmup_steps}: must be >= 0")
    if not 0 <= optim.warmup_ratio < 1:
        raise ValueError(f"config optim.warmup_ratio={optim.warmup_ratio}: must be in [0, 1) (a fraction of the run's steps)")
    if optim.warmup_steps and optim.warmup_ratio:
        raise ValueError(
            f"config optim.warmup_steps={optim.warmup_steps} and optim.warmup_ratio={optim.warmup_ratio} are both set: "
            "the warmup is one or the other (set the unused one to 0)"
        )


# Where deepeyes.tools.search_service.SerpAPISearch reads its key (tests/jobs/test_config.py checks they agree).
SERPAPI_KEY_VARIABLE = "SERPAPI_API_KEY"


def _check_serpapi_key(job: RLJobConfig) -> None:
    """The RL job's search service reads the SerpAPI key from the environment the job inherits from
    this one (sbatch exports it unless cluster.sbatch_extra.export says otherwise): without it the
    service would fail to start after the queue wait."""
    keys = [f"tools.{key}" for key in ("search_backend", "image_search_backend") if getattr(job.tools, key) == "serpapi"]
    if not keys:
        return
    uses = " and ".join(f"{key}=serpapi" for key in keys)
    if not os.environ.get(SERPAPI_KEY_VARIABLE):
        raise ValueError(
            f"config {uses} needs the SerpAPI key in the environment variable {SERPAPI_KEY_VARIABLE}, which is not "
            f"set here: export {SERPAPI_KEY_VARIABLE}=<key> before submitting (the job inherits it), or search "
            "locally (tools.search_backend=local with data.corpus)"
        )
    export = job.cluster.sbatch_extra.get("export")
    if export is not None and "ALL" not in export.split(",") and SERPAPI_KEY_VARIABLE not in export:
        raise ValueError(
            f"config {uses} needs {SERPAPI_KEY_VARIABLE} in the job's environment, but "
            f"cluster.sbatch_extra.export={export!r} does not pass it on: add {SERPAPI_KEY_VARIABLE} (or ALL) to it"
        )


def _refuse_sample_data(job: Any) -> None:
    """With data.allow_sample=false: every file the job reads is configured, and none is the
    bundled sample data (which fills in for unset files otherwise)."""
    data, needed = job.data, {}
    if isinstance(job, SFTJobConfig) and not data.sft_mix:
        needed["data.sft"] = data.sft
    if isinstance(job, RLJobConfig):
        if not data.train_mix:
            needed["data.train"] = data.train
        if job.tools.search_backend == "local":
            needed["data.corpus"] = data.corpus
        if job.tools.image_search_backend == "local":
            needed["data.image_index"] = data.image_index
    needed |= {f"{key}[{i}]": source.path for key, mix in (("data.train_mix", data.train_mix), ("data.sft_mix", data.sft_mix))
               for i, source in enumerate(mix)}
    for key, path in needed.items():
        if path is None:
            raise ValueError(
                f"config {key} is not set, and data.allow_sample=false refuses the bundled toy data that would "
                f"stand in for it: set {key}=<file> (jobs/prepare_data.py writes it), or data.allow_sample=true"
            )
        if _in_sample_data(path):
            raise ValueError(
                f"config {key}={path} is the bundled toy data, which data.allow_sample=false refuses "
                "(set data.allow_sample=true to train on it anyway)"
            )


def _in_sample_data(path: str) -> bool:
    try:
        relative = Path(path).resolve().relative_to((cache_root() / "data").resolve())
    except ValueError:
        return False
    return relative.parts[0].startswith("sample-") if relative.parts else False


def _check_mixture(key: str, sources: list[SourceConfig], single: Optional[str], single_key: str) -> None:
    if sources and single:
        raise ValueError(f"config {key} and {single_key} are both set: a mixture replaces the single file")
    names = [source.name for source in sources]
    for index, source in enumerate(sources):
        if not source.name or not source.path:
            raise ValueError(f"config {key}[{index}]: needs a name and a path, got {source}")
        if not source.weight > 0:
            raise ValueError(f"config {key}[{index}] ({source.name}): weight must be > 0, got {source.weight}")
        if names.count(source.name) > 1:
            raise ValueError(f"config {key}: source name {source.name!r} appears more than once")


def _check_positive(cfg: DictConfig) -> None:
    for key in (
        "rollout.n", "rollout.max_turn_tokens", "rollout.max_response_tokens", "rollout.max_turns",
        "rollout.max_batch", "grpo.prompts_per_step", "grpo.steps", "grpo.micro_batch_size",
        "sft.epochs", "sft.batch_size", "sft.micro_batch_size", "sft.cutoff_len", "optim.lr",
        "eval.n", "eval.questions_per_batch", "filter.k", "filter.prompts_per_batch",
        "synth.k", "synth.concurrency", "synth.attempts_per_batch", "teacher.max_concurrency", "teacher.timeout_s",
        "tools.code.timeout_s", "tools.code.memory_mb", "tools.code.max_processes", "tools.code.cpus",
        "tools.code.scratch_mb", "tools.code.cpu_s", "tools.code.max_sessions",
    ):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value <= 0:
            raise ValueError(f"config {key}={value}: must be > 0")
    budget = OmegaConf.select(cfg, "model.max_trajectory_pixels", default=0)
    if budget and budget < OmegaConf.select(cfg, "model.max_pixels"):
        raise ValueError(f"config model.max_trajectory_pixels={budget}: must be 0 (no limit) or >= model.max_pixels")
    if OmegaConf.select(cfg, "run.keep_checkpoints", default=0) < 0:
        raise ValueError(f"config run.keep_checkpoints={cfg.run.keep_checkpoints}: must be >= 0 (0 = keep all)")
    if OmegaConf.select(cfg, "rollout.temperature", default=1.0) <= 0:
        raise ValueError("config rollout.temperature must be > 0 (greedy rollouts give GRPO no signal)")
