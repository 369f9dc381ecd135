"""The launch plan: which node runs which role, on which GPUs and ports, with how much memory.

A role is data — a name, a command, a node, its GPUs, a port, whether it has a /ready check —
so a new service joins the plan by adding one `Role` (or, without code, `cluster.extra_roles`).
The same plan is printed before submission (`cluster.dry_run=true`), rendered into an sbatch
script, and executed by the node agent on every allocated node.

Placement, for `nodes` nodes of `gpus_per_node` GPUs each (R = rollout_nodes, all but node 0 by default):

    node 0                  trainer (all its GPUs), search service
    the last R nodes        one rollout server each (all its GPUs); with R = 0, `rollout.servers`
                            servers share node 0 (and the second half of its GPUs)
    the last node           the judge (a rollout server with the judge model), when enabled
    every node              a sandbox daemon (bound to the node's address, token-checked: the
                            trainer spreads its sessions over all of them), each `cluster.extra_roles` entry

Commands carry placeholders ({host}, {port}, {token_file}) that the node agent fills in. The
trainer finds the services through DEEPEYES_SERVICES (see deepeyes.launch.agent).

Ports are a fixed function of the plan: role k gets `port_base + k` shifted by 100 per job id
(mod 200), so roles never collide with each other — even when every "node" is this one machine —
nor with another job sharing a node.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PORTS_PER_JOB = 100
PORT_SHIFTS = 200
RENDEZVOUS_PORT_OFFSET = 0  # torch.distributed's MASTER_PORT; role ports start after it
# Services are placed once their commands exist in this checkout (they are built alongside).
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

    def roles_on(self, node: int) -> list[Role]:
        return [role for role in self.roles if role.node == node]

    def port(self, role: Role, job_id: int) -> int:
        return self.port_base + PORTS_PER_JOB * (job_id % PORT_SHIFTS) + role.port_offset

    def rendezvous_port(self, job_id: int) -> int:
        return self.port_base + PORTS_PER_JOB * (job_id % PORT_SHIFTS) + RENDEZVOUS_PORT_OFFSET

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
                lines.append(f"    {role.name:<10} gpus {gpus:<16} port {port:<14}{flags}  {' '.join(role.command)}")
        lines.append(
            f"  ports: {self.port_base} + {PORTS_PER_JOB} x (job id % {PORT_SHIFTS}) + offset; "
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
PROMPT_TEXT_TOKENS = 1024  # the system prompt and a question; the prompt's image comes on top

# Parameter counts of the models the config names (the vision tower included).
_PARAMETERS = {"tiny": 10e6, "qwen2_5_vl_7b": 8.3e9, "qwen2_5_vl_32b": 33.5e9}
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def build_plan(job: str, cfg: Any, launch_dir: Path) -> LaunchPlan:
    """The plan for a validated job config (RLJobConfig or SFTJobConfig); raises on a plan
    that cannot run (too few nodes, a GPU backend without GPUs, memory below the estimate)."""
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

    params = _PARAMETERS.get(cfg.model.name)
    weight_gb = (params or 0) * _BYTES[cfg.model.dtype] / 1e9
    all_gpus = list(range(cluster.gpus_per_node))
    roles: list[Role] = []
    next_port = RENDEZVOUS_PORT_OFFSET + 1

    def add(role: Role, serves: bool = True) -> None:
        nonlocal next_port
        if serves:
            role.port_offset = next_port
            next_port += 1
        roles.append(role)

    # The trainer: plain memory estimate, host side. On GPUs the host holds a staging copy of the
    # weights while loading; on CPU it holds fp32 weights, gradients and Adam's two moments.
    trainer_memory = (weight_gb + 4) if cluster.gpus_per_node else ((params or 0) * 16 / 1e9 + 2)
    pixel_cache_gb = cfg.model.pixel_cache_mb / 1024
    trainer_memory += pixel_cache_gb
    if job == "rl":  # the step's trajectories, all held by the trainer until its update
        tokens = PROMPT_TEXT_TOKENS + cfg.model.max_pixels // 784 + cfg.rollout.max_response_tokens
        trainer_memory += cfg.grpo.prompts_per_step * cfg.rollout.n * tokens * TRAJECTORY_BYTES_PER_TOKEN / 1e9
    servers_beside_trainer = 0 if rollout_nodes or job != "rl" else cfg.rollout.servers
    trainer_gpus, serving_gpus = all_gpus, all_gpus
    if servers_beside_trainer and len(all_gpus) > 1:  # one node: the first half trains, the rest serves
        trainer_gpus, serving_gpus = all_gpus[: len(all_gpus) // 2], all_gpus[len(all_gpus) // 2 :]
    # The megatron trainer runs one rank per GPU on each trainer node; the reference (hf) trainer is one process.
    ranks = len(trainer_gpus) if megatron and trainer_gpus else 1
    world = ranks * trainer_nodes
    model_parallel = cfg.trainer.tensor_parallel * cfg.trainer.pipeline_parallel if megatron else 1
    if world % model_parallel:
        raise ValueError(
            f"config trainer.tensor_parallel x trainer.pipeline_parallel = {model_parallel} does not divide the "
            f"{world} trainer rank(s) ({trainer_nodes} node(s) x one per trainer GPU: {trainer_gpus or 'no GPUs'})"
        )
    for node in range(trainer_nodes):
        add(Role("trainer", trainer_command(launch_dir), node=node, gpus=trainer_gpus, main=True,
                 memory_gb=trainer_memory * ranks, processes=ranks, first_rank=node * ranks, world_size=world),
            serves=False)
    server_memory = ((weight_gb + 2) if cluster.gpus_per_node else ((params or 0) * 4 / 1e9 + 1)) + pixel_cache_gb
    if job == "rl":
        from deepeyes.rollout.services import rollout_server_command, search_service_command
        from deepeyes.train.setup import data_paths

        model = Path(cfg.model.path) if cfg.model.path else _tiny_model_path()
        threads = cfg.rollout.server_threads
        # Rollout servers: one per rollout node (all its GPUs), or `rollout.servers` beside the
        # trainer when every node trains (0 = generate in the trainer's own process).
        placements = range(cluster.nodes - rollout_nodes, cluster.nodes) if rollout_nodes else [0] * servers_beside_trainer
        shares = [all_gpus] * rollout_nodes if rollout_nodes else _split(serving_gpus, servers_beside_trainer)
        for node, gpus in zip(placements, shares):
            command = rollout_server_command(cfg, model, PORT, TOKEN_FILE, 0, threads) + ["--host", HOST]
            add(Role("rollout", command, node=node, gpus=gpus, ready=True, memory_gb=server_memory))
        paths = data_paths(cfg.data)
        search = search_service_command(
            cfg, paths.corpus, paths.image_index, paths.train, launch_dir / "search_cache", PORT, TOKEN_FILE
        )
        add(Role("search", search + ["--host", HOST], node=0, ready=True, memory_gb=1.0))
        if cfg.reward.judge.enabled:
            judge_model = Path(cfg.reward.judge.model) if cfg.reward.judge.model else _tiny_model_path()
            command = rollout_server_command(cfg, judge_model, PORT, TOKEN_FILE, 0, threads) + ["--host", HOST]
            add(Role("judge", command, node=cluster.nodes - 1, ready=True, memory_gb=server_memory))
    if job == "rl":
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
            add(Role(extra.name, list(extra.command), node=node, ready=extra.ready, memory_gb=1.0))
    if next_port > PORTS_PER_JOB:
        raise ValueError(f"the plan needs {next_port} ports; a job has {PORTS_PER_JOB}")

    plan = LaunchPlan(
        job, cluster.nodes, cluster.gpus_per_node, cluster.cpus_per_node, cluster.mem_gb, cluster.port_base,
        cluster.ready_timeout_s, cluster.signal_delay_s, cluster.max_requeues, roles,
    )
    if params is None:
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


def _split(gpus: list[int], parts: int) -> list[list[int]]:
    """`parts` contiguous equal shares of `gpus`; with fewer GPUs than parts, they are shared."""
    if parts == 0:
        return []
    if len(gpus) < parts:
        return [[gpus[i % len(gpus)]] if gpus else [] for i in range(parts)]
    size = len(gpus) // parts
    return [gpus[i * size : (i + 1) * size] for i in range(parts)]


def trainer_command(launch_dir: Path) -> list[str]:
    return [sys.executable, "-m", "deepeyes.launch.trainer", str(launch_dir)]


def _tiny_model_path() -> Path:
    from deepeyes.model import ensure_tiny_model

    return ensure_tiny_model()
