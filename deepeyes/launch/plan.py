"""The launch plan: which node runs which role, on which GPUs and ports, with how much memory.

A role is data — a name, a command, a node, its GPUs, a port, whether it has a /ready check —
so a new service joins the plan by adding one `Role` (or, without code, `cluster.extra_roles`).
The same plan is printed before submission (`cluster.dry_run=true`), rendered into an sbatch
script, and executed by the node agent on every allocated node.

Placement, for `nodes` nodes of `gpus_per_node` GPUs each (R = rollout_nodes, all but the
trainer nodes by default):

    the first trainer_nodes  trainer ranks (one per GPU); node 0 also runs the search service
    the last R nodes         rollout engines: gpus_per_node / rollout.tensor_parallel per node,
                             each a server process on its own port with its own slice of GPUs
                             (CUDA_VISIBLE_DEVICES); with R = 0, the engines share node 0 (its
                             second half of GPUs; `rollout.servers` servers without GPUs)
    the last serving node    the judge (a rollout server with the judge model), when enabled: it
                             takes one engine's slot of GPUs
    every node               a sandbox daemon (bound to the node's address, token-checked: the
                             trainer spreads its sessions over all of them), each `cluster.extra_roles` entry

Why a server process per engine rather than vLLM's data parallelism behind one endpoint: each
engine stays addressable on its own, so the rollout client keeps a trajectory on the engine that
holds its prefix cache, the weight sync reaches every engine the same way (file or broadcast),
an engine that dies takes only its own requests with it, and the hf backend places the same way.

Commands carry placeholders ({host}, {port}, {token_file}) that the node agent fills in. The
trainer finds the services through DEEPEYES_SERVICES (see deepeyes.launch.agent).

Ports are a fixed function of the plan: role k gets `port_base + k` shifted by the job's span of
ports per job id, so roles never collide with each other — even when every "node" is this one
machine — nor with another job sharing a node.

Memory is checked before anything is queued: host memory per node against `cluster.mem_gb`,
and, on GPU nodes, every trainer rank and rollout engine against `cluster.gpu_memory_gb`
(deepeyes.launch.memory). The dry run prints the estimate per GPU.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deepeyes.launch.memory import (
    DTYPE_BYTES, TRAINER_RESERVE_GIB, ModelShape, TrainerLayout, model_shape, rollout_memory, trainer_memory,
)
from deepeyes.rollout.vllm_engine import rollout_max_model_len

PORT_RANGE = 12000  # every job's ports lie in [port_base, port_base + PORT_RANGE)
MIN_PORTS_PER_JOB = 100
RENDEZVOUS_PORT_OFFSET = 0  # torch.distributed's MASTER_PORT; role ports start after it
# Placeholders in role commands; the node agent fills them in on the node.
PORT, HOST, TOKEN_FILE = "{port}", "{host}", "{token_file}"


@dataclass
class Role:
    name: str
    command: list[str]
    node: int  # index into the allocation's node list
    gpus: list[int] = field(default_factory=list)  # node-local GPU indices (CUDA_VISIBLE_DEVICES)
    port_offset: int | None = None  # None: the role serves nothing
    ready: bool = False  # GET /ready must answer 200 before the trainer starts
    node_local: bool = False  # binds loopback: only roles on its own node reach it
    main: bool = False  # the job is over when this role exits
    memory_gb: float = 0.0  # estimated host memory
    gpu_memory: str = ""  # the estimate per GPU, as the dry run prints it
    # The node agent starts a role with the job's whole environment only when it inherits it (the
    # trainer: wandb; extra roles: the user's command); any other role gets deepeyes.service's
    # service_environment and just the secrets it names (search: SERPAPI_API_KEY).
    inherit_environment: bool = False
    secrets: list[str] = field(default_factory=list)
    # A multi-rank trainer: this node's `processes` ranks are first_rank, first_rank + 1, ... of world_size.
    processes: int = 1
    first_rank: int = 0
    world_size: int = 1

    @property
    def serves(self) -> bool:
        return self.port_offset is not None


@dataclass
class LaunchPlan:
    job: str  # "rl" | "sft"
    nodes: int
    gpus_per_node: int
    cpus_per_node: int
    mem_gb: int  # requested per node; 0 = the whole node
    port_base: int
    ready_timeout_s: float
    signal_delay_s: int
    max_requeues: int
    roles: list[Role]
    ports_per_job: int = MIN_PORTS_PER_JOB

    def roles_on(self, node: int) -> list[Role]:
        return [role for role in self.roles if role.node == node]

    def _first_port(self, job_id: int) -> int:
        return self.port_base + self.ports_per_job * (job_id % (PORT_RANGE // self.ports_per_job))

    def port(self, role: Role, job_id: int) -> int:
        return self._first_port(job_id) + role.port_offset

    def rendezvous_port(self, job_id: int) -> int:
        return self._first_port(job_id) + RENDEZVOUS_PORT_OFFSET

    def log_name(self, role: Role, rank: int = 0) -> str:
        """`<role>_node<N>[_<k>][_rank<r>].log`: k numbers the roles of one name on a node (its
        rollout engines), r the trainer's ranks after the first."""
        same = [other for other in self.roles_on(role.node) if other.name == role.name]
        index = f"_{next(k for k, other in enumerate(same) if other is role)}" if len(same) > 1 else ""
        return f"{role.name}_node{role.node}{index}{f'_rank{rank}' if rank else ''}.log"

    def memory_needed_gb(self, node: int) -> float:
        return sum(role.memory_gb for role in self.roles_on(node))

    def describe(self) -> str:
        """The plan as a person reads it before submitting."""
        lines = [f"launch plan: {self.job} on {self.nodes} node(s) x {self.gpus_per_node} GPU(s)"]
        for node in range(self.nodes):
            need = self.memory_needed_gb(node)
            have = f"{self.mem_gb} GB requested" if self.mem_gb else "the whole node requested"
            cpus = self.cpus_per_node or "Slurm's default"
            lines.append(f"  node {node}: {cpus} CPUs; memory need ~{need:.1f} GB ({have})")
            for role in self.roles_on(node):
                gpus = ",".join(map(str, role.gpus)) if role.gpus else "-"
                port = f"port_base+{role.port_offset}" if role.serves else "-"
                flags = " main" if role.main else (" ready-check" if role.ready else "")
                flags += f" x{role.processes} ranks" if role.processes > 1 else ""
                lines.append(f"    {role.name:<10} gpus {gpus:<16} port {port:<14}{flags}  log {self.log_name(role)}  "
                             f"{' '.join(role.command)}")
                if role.gpu_memory:
                    lines.append(f"    {'':<10} GPU memory per GPU: {role.gpu_memory}")
        span = PORT_RANGE // self.ports_per_job
        lines.append(
            f"  ports: {self.port_base} + {self.ports_per_job} x (job id % {span}) + offset; "
            f"rendezvous (MASTER_PORT) at offset {RENDEZVOUS_PORT_OFFSET}"
        )
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "LaunchPlan":
        data = json.loads(text)
        data["roles"] = [Role(**role) for role in data["roles"]]
        return cls(**data)


# Host memory of the image path, measured by bench/host_memory.py (2048 x 1536 inputs at the 7B's
# 262144-pixel budget, a crop returned per code turn; PSS, so pages that the sandbox's forked
# kernels share count once). Images travel by reference, so a trajectory held by the trainer
# costs its token lists and image paths: 153 KB for 2187 tokens, counted per token. An open sandbox
# session is a kernel holding its decoded image_1: 24.5 MB. Processed pixels: model.pixel_cache_mb
# per process.
TRAJECTORY_BYTES_PER_TOKEN = 70
SANDBOX_SESSION_GB = 0.025
def max_trajectory_tokens(cfg: Any) -> int:
    """The longest trajectory the rollout limits allow (vLLM's max_model_len; the trainer's
    sequence length): deepeyes.rollout.vllm_engine.rollout_max_model_len."""
    return rollout_max_model_len(cfg.model, cfg.rollout)


@dataclass(frozen=True)
class _Placement:
    """Which nodes train and which serve rollouts, and the trainer's GPUs."""

    trainer_nodes: int
    rollout_nodes: int
    trainer_gpus: list[int]
    serving_gpus: list[int]  # on a node shared with the trainer (rollout_nodes = 0)
    ranks_per_node: int

    @property
    def world(self) -> int:
        return self.ranks_per_node * self.trainer_nodes


def build_plan(job: str, cfg: Any, launch_dir: Path) -> LaunchPlan:
    """The plan for a validated job config (RLJobConfig or SFTJobConfig); raises on a plan
    that cannot run (too few nodes, a GPU backend without GPUs, host or GPU memory below the
    estimate), naming the keys to change."""
    cluster = cfg.cluster
    place = _placement(job, cfg)
    model_path = Path(cfg.model.path) if cfg.model.path else _tiny_model_path()
    shape = model_shape(cfg.model.name, model_path)
    weight_gb = (shape.parameters * DTYPE_BYTES[cfg.model.dtype] / 1e9) if shape else 0.0
    roles: list[Role] = []
    next_port = RENDEZVOUS_PORT_OFFSET + 1

    def add(role: Role, serves: bool = True) -> None:
        nonlocal next_port
        if serves:
            role.port_offset = next_port
            next_port += 1
        roles.append(role)

    # The trainer, host side, per rank. On GPUs a megatron rank reads only its own slices of the
    # checkpoint (1.04-1.22x its share measured by bench/host_memory.py --loading, so 1.25x), the
    # reference trainer the whole model; on CPU it holds fp32 weights, gradients and Adam's moments.
    # The RL leader (node 0) also keeps the whole HF model for its rollout side.
    params = shape.parameters if shape else 0
    if not cluster.gpus_per_node:
        trainer_memory_gb = params * 16 / 1e9 + 2
    elif cfg.trainer.backend == "megatron" and shape is not None:
        split = cfg.trainer.tensor_parallel * cfg.trainer.pipeline_parallel
        share = shape.language_parameters / split + shape.vision.parameters
        trainer_memory_gb = 1.25 * DTYPE_BYTES[cfg.model.dtype] * share / 1e9 + 4
    else:
        trainer_memory_gb = weight_gb + 4
    pixel_cache_gb = cfg.model.pixel_cache_mb / 1024
    trainer_memory_gb += pixel_cache_gb
    if job == "rl":  # the step's trajectories, held by every rank until its update
        trainer_memory_gb += (cfg.grpo.prompts_per_step * cfg.rollout.n * max_trajectory_tokens(cfg)
                              * TRAJECTORY_BYTES_PER_TOKEN / 1e9)
    leader_copy_gb = weight_gb if job == "rl" and cluster.gpus_per_node and cfg.trainer.backend == "megatron" else 0.0
    trainer_gpu = _trainer_gpu_memory(job, cfg, place, shape)
    for node in range(place.trainer_nodes):
        add(Role("trainer", trainer_command(launch_dir), node=node, gpus=place.trainer_gpus, main=True,
                 inherit_environment=True,
                 memory_gb=trainer_memory_gb * place.ranks_per_node + (leader_copy_gb if node == 0 else 0.0),
                 gpu_memory=trainer_gpu,
                 processes=place.ranks_per_node, first_rank=node * place.ranks_per_node, world_size=place.world),
            serves=False)
    server_memory_gb = ((weight_gb + 2) if cluster.gpus_per_node else (params * 4 / 1e9 + 1)) + pixel_cache_gb
    if job == "rl":
        from deepeyes.rollout.services import search_secrets, search_service_command
        from deepeyes.train.setup import data_paths

        engines, judge_slot = _engine_slots(cfg, place)
        rollout_tp, judge_tp = cfg.rollout.tensor_parallel, judge_tensor_parallel(cfg)
        rollout_gpu = _rollout_gpu_memory(cfg, shape, "rollout", ("rollout.tensor_parallel", rollout_tp))
        if rollout_gpu and engines:
            batch = cfg.grpo.prompts_per_step * cfg.rollout.n
            rollout_gpu += f"; the step's {batch} trajectories are ~{math.ceil(batch / len(engines))} per engine"
        for node, gpus in engines:
            add(Role("rollout", _server_command(cfg, model_path, rollout_tp), node=node, gpus=gpus, ready=True,
                     memory_gb=server_memory_gb, gpu_memory=rollout_gpu))
        paths = data_paths(cfg.data, cfg.tools)
        search = search_service_command(
            cfg, paths.corpus, paths.image_index, paths.train, launch_dir / "search_cache", PORT, TOKEN_FILE
        )
        add(Role("search", search + ["--host", HOST], node=0, ready=True, memory_gb=1.0,
                 secrets=search_secrets(cfg.tools)))
        if judge_slot is not None:
            judge_path = Path(cfg.reward.judge.model) if cfg.reward.judge.model else _tiny_model_path()
            node, gpus = judge_slot
            add(Role("judge", _server_command(cfg, judge_path, judge_tp), node=node, gpus=gpus, ready=True,
                     memory_gb=server_memory_gb,
                     gpu_memory=_rollout_gpu_memory(cfg, model_shape("", judge_path), "judge",
                                                         ("reward.judge.tensor_parallel", judge_tp))))
        from deepeyes.tools.sandbox_client import daemon_command, sandbox_limits

        code = cfg.tools.code
        for node in range(cluster.nodes):
            command = daemon_command(PORT, TOKEN_FILE, launch_dir / "sandbox" / f"node{node}", sandbox_limits(code),
                                     code.max_sessions, code.idle_timeout_s, code.isolation,
                                     store_root=launch_dir.parent / "scratch", host=HOST)
            add(Role("sandbox", command, node=node, ready=True, memory_gb=0.5 + SANDBOX_SESSION_GB * code.max_sessions))
    for extra in cluster.extra_roles:
        if not extra.name or not extra.command:
            raise ValueError(f"config cluster.extra_roles: every role needs a name and a command, got {extra}")
        for node in range(cluster.nodes) if extra.every_node else [0]:
            add(Role(extra.name, list(extra.command), node=node, ready=extra.ready, memory_gb=1.0,
                     inherit_environment=True))
    ports_per_job = MIN_PORTS_PER_JOB * math.ceil(next_port / MIN_PORTS_PER_JOB)
    if cluster.port_base + PORT_RANGE > 65536 or ports_per_job > PORT_RANGE:
        raise ValueError(f"config cluster.port_base={cluster.port_base}: the job's ports need "
                         f"[port_base, port_base + {PORT_RANGE}) below 65536 and {ports_per_job} ports per job")

    plan = LaunchPlan(
        job, cluster.nodes, cluster.gpus_per_node, cluster.cpus_per_node, cluster.mem_gb, cluster.port_base,
        cluster.ready_timeout_s, cluster.signal_delay_s, cluster.max_requeues, roles, ports_per_job,
    )
    if shape is None:
        return plan  # an unknown model: no memory estimate to check against
    for node in range(plan.nodes):
        need = math.ceil(plan.memory_needed_gb(node))
        if plan.mem_gb and plan.mem_gb < need:
            names = ", ".join(role.name for role in plan.roles_on(node))
            raise ValueError(
                f"config cluster.mem_gb={plan.mem_gb} is below the estimated {need} GB that node {node} "
                f"needs ({names}); raise cluster.mem_gb or use 0 for the whole node"
            )
    return plan


def _placement(job: str, cfg: Any) -> _Placement:
    cluster = cfg.cluster
    if cluster.nodes < 1:
        raise ValueError(f"config nodes={cluster.nodes}: must be >= 1")
    megatron = cfg.trainer.backend == "megatron"
    trainer_nodes = cluster.trainer_nodes or (1 if job == "rl" else cluster.nodes)
    rollout_nodes = (cluster.nodes - trainer_nodes) if cluster.rollout_nodes < 0 else cluster.rollout_nodes
    if job != "rl":
        rollout_nodes = 0
    if trainer_nodes + rollout_nodes > cluster.nodes or trainer_nodes < 1:
        raise ValueError(
            f"config cluster.trainer_nodes={trainer_nodes} and cluster.rollout_nodes={rollout_nodes} do not fit "
            f"nodes={cluster.nodes}: at least one node trains, and no node both trains and serves rollouts"
        )
    if trainer_nodes > 1 and not megatron:
        raise ValueError(f"config cluster.trainer_nodes={trainer_nodes} needs trainer=megatron (trainer=hf is one process)")
    if job == "rl" and cfg.rollout.backend == "vllm" and cluster.gpus_per_node < 1:
        raise ValueError("config rollout.backend=vllm needs GPUs: set cluster.gpus_per_node")
    all_gpus = list(range(cluster.gpus_per_node))
    trainer_gpus, serving_gpus = all_gpus, []
    if job == "rl" and not rollout_nodes and cfg.rollout.servers and len(all_gpus) > 1:
        # One node: the first half trains, the rest serves.
        trainer_gpus, serving_gpus = all_gpus[: len(all_gpus) // 2], all_gpus[len(all_gpus) // 2 :]
    # The megatron trainer runs one rank per GPU on each trainer node; the reference (hf) trainer is one process.
    ranks = len(trainer_gpus) if megatron and trainer_gpus else 1
    place = _Placement(trainer_nodes, rollout_nodes, trainer_gpus, serving_gpus, ranks)
    model_parallel = cfg.trainer.tensor_parallel * cfg.trainer.pipeline_parallel if megatron else 1
    if place.world % model_parallel:
        raise ValueError(
            f"config trainer.tensor_parallel x trainer.pipeline_parallel = {model_parallel} does not divide the "
            f"{place.world} trainer rank(s) ({trainer_nodes} node(s) x one per trainer GPU: {trainer_gpus or 'no GPUs'})"
        )
    return place


def _engine_slots(cfg: Any, place: _Placement) -> tuple[list[tuple[int, list[int]]], tuple[int, list[int]] | None]:
    """(node, GPUs) of every rollout engine, and of the judge when enabled: each serving node's
    GPUs in slices of rollout.tensor_parallel, the judge taking the last reward.judge.tensor_parallel
    GPUs of the last serving node; without GPUs, one server per rollout node (or `rollout.servers`
    on a node shared with the trainer) and the judge beside them on the last node."""
    cluster, tp, judge_tp = cfg.cluster, cfg.rollout.tensor_parallel, judge_tensor_parallel(cfg)
    judge = cfg.reward.judge.enabled
    for key, value in (("rollout.tensor_parallel", tp), ("reward.judge.tensor_parallel", judge_tp)):
        if value < 1:
            raise ValueError(f"config {key}={value}: must be >= 1")
    if place.rollout_nodes:
        nodes = list(range(cluster.nodes - place.rollout_nodes, cluster.nodes))
        gpus = list(range(cluster.gpus_per_node))
    else:
        nodes, gpus = [0], place.serving_gpus
    if not gpus:
        if cfg.rollout.backend == "vllm" and (cfg.rollout.servers or place.rollout_nodes):
            raise ValueError("config rollout.backend=vllm: no GPU is left to serve on (one node with one GPU); "
                             "raise cluster.gpus_per_node or add a rollout node")
        per_node = 1 if place.rollout_nodes else cfg.rollout.servers
        return [(node, []) for node in nodes for _ in range(per_node)], (cluster.nodes - 1, []) if judge else None
    where = "cluster.gpus_per_node" if place.rollout_nodes else "the serving half of node 0's GPUs"
    if len(gpus) % tp:
        raise ValueError(f"config rollout.tensor_parallel={tp} does not divide the {len(gpus)} GPUs a rollout node "
                         f"serves with ({where})")
    slots = [(node, gpus[i : i + tp]) for node in nodes for i in range(0, len(gpus), tp)]
    if not judge:
        return slots, None
    if judge_tp > len(gpus):
        raise ValueError(f"config reward.judge.tensor_parallel={judge_tp}: a serving node has {len(gpus)} GPUs ({where})")
    judge_gpus = gpus[len(gpus) - judge_tp:]
    slots = [(node, slot) for node, slot in slots if node != nodes[-1] or not set(slot) & set(judge_gpus)]
    if not slots:
        raise ValueError(
            f"config reward.judge.enabled=true takes {judge_tp} GPUs (reward.judge.tensor_parallel) and leaves no "
            f"engine to generate: add a rollout node (cluster.rollout_nodes) or lower the tensor parallelism"
        )
    return slots, (nodes[-1], judge_gpus)


def judge_tensor_parallel(cfg: Any) -> int:
    return cfg.reward.judge.tensor_parallel or cfg.rollout.tensor_parallel


def _server_command(cfg: Any, model: Path, tensor_parallel: int) -> list[str]:
    from deepeyes.rollout.services import rollout_server_command

    command = rollout_server_command(cfg, model, PORT, TOKEN_FILE, 0, cfg.rollout.server_threads) + ["--host", HOST]
    if cfg.rollout.backend == "vllm":
        command += [
            "--tensor-parallel", str(tensor_parallel), "--max-model-len", str(max_trajectory_tokens(cfg)),
            "--gpu-memory-utilization", str(cfg.rollout.gpu_memory_utilization),
        ]
    return command


# A GPU estimate needs the model's shape: its config.json, or a paper model's known shape.
NOT_ESTIMATED = "not estimated: the model's config.json is not readable here and its shape is not known"


def _trainer_gpu_memory(job: str, cfg: Any, place: _Placement, shape: ModelShape | None) -> str:
    """The trainer's estimate per GPU (empty without GPUs); raises when it
    cannot fit, naming the keys that change it."""
    if not place.trainer_gpus:
        return ""
    if shape is None:
        return NOT_ESTIMATED
    trainer = cfg.trainer
    megatron = trainer.backend == "megatron"
    tp, pp = (trainer.tensor_parallel, trainer.pipeline_parallel) if megatron else (1, 1)
    if job == "rl":
        micro_key, micro, length_key, length = ("grpo.micro_batch_size", cfg.grpo.micro_batch_size,
                                                "rollout.max_response_tokens", max_trajectory_tokens(cfg))
    else:
        micro_key, micro, length_key, length = ("sft.micro_batch_size", cfg.sft.micro_batch_size,
                                                "sft.cutoff_len", cfg.sft.cutoff_len)
    layout = TrainerLayout(
        tensor=tp, pipeline=pp, data=place.world // (tp * pp), sequence_parallel=megatron and trainer.sequence_parallel,
        distributed_optimizer=megatron and trainer.distributed_optimizer, recompute=megatron and trainer.recompute,
        tokens=micro * length, dtype=cfg.model.dtype, megatron=megatron,
    )
    estimate = trainer_memory(shape, layout)
    detail = estimate.describe(layout)
    capacity = cfg.cluster.gpu_memory_gb - TRAINER_RESERVE_GIB
    if estimate.total > capacity:
        raise ValueError(
            f"the trainer does not fit its GPUs: {detail} per GPU, above the {capacity:.0f} GiB usable of "
            f"cluster.gpu_memory_gb={cfg.cluster.gpu_memory_gb:g} (less {TRAINER_RESERVE_GIB:g} for CUDA and NCCL). "
            f"Now trainer.tensor_parallel={tp}, trainer.pipeline_parallel={pp}, "
            f"trainer.distributed_optimizer={layout.distributed_optimizer} (over {layout.data} data-parallel ranks), "
            f"trainer.recompute={layout.recompute}, trainer.sequence_parallel={layout.sequence_parallel}, "
            f"{micro_key}={micro} x {length} tokens ({length_key}). Raise the parallel sizes, turn on the distributed "
            f"optimizer or recompute, or shorten the micro-batch"
        )
    return detail


def _rollout_gpu_memory(cfg: Any, shape: ModelShape | None, role: str, tensor_parallel: tuple[str, int]) -> str:
    """A vLLM engine's estimate per GPU; raises when its share cannot hold the weights and one
    sequence of max_model_len (vLLM would refuse to start after the queue wait). `tensor_parallel`
    is (its key, its value)."""
    if cfg.rollout.backend != "vllm":
        return ""
    if shape is None:
        return NOT_ESTIMATED
    rollout = cfg.rollout
    tp_key, tp = tensor_parallel
    estimate = rollout_memory(shape, tp, cfg.model.dtype, cfg.cluster.gpu_memory_gb,
                              rollout.gpu_memory_utilization, max_trajectory_tokens(cfg))
    if estimate.sequences < 1:
        raise ValueError(
            f"the {role} engine does not fit its GPUs: {estimate.describe()}, and one sequence of max_model_len="
            f"{estimate.max_model_len} needs {estimate.kv_per_sequence:.1f} GiB of KV cache. Now "
            f"{tp_key}={tp}, rollout.gpu_memory_utilization="
            f"{rollout.gpu_memory_utilization:g}, cluster.gpu_memory_gb={cfg.cluster.gpu_memory_gb:g}, "
            f"rollout.max_response_tokens={rollout.max_response_tokens}: raise the first two or shorten the responses"
        )
    return estimate.describe()


def trainer_command(launch_dir: Path) -> list[str]:
    return [sys.executable, "-m", "deepeyes.launch.trainer", str(launch_dir)]


def _tiny_model_path() -> Path:
    from deepeyes.model import ensure_tiny_model

    return ensure_tiny_model()
