"""Weight sync: after each optimizer step the trainer's leader makes version k+1 what the rollout
servers serve (`rollout.weight_sync`). Only parameters that train move — a frozen vision tower
never changes. Either way the version bookkeeping is the same: responses carry the version, the
trainer bounds staleness (`WeightSync.wait_for`), servers refuse requests that need newer weights.

- `file` (`WeightSync`): version k+1 is one safetensors file, `<root>/weights_v{k+1:06d}.safetensors`
  on the shared filesystem (written beside, then renamed: a reader never sees half a file), and
  every server loads it (`RolloutClient.update_weights`).
- `broadcast` (`BroadcastWeightSync`): the leader broadcasts the parameters to every rollout
  engine over a process group of its own (rank 0 = the trainer's leader, then each engine's
  ranks), in buckets. Gloo between CPU processes; NCCL between GPUs through vLLM's communicator,
  the one vLLM's workers join. The wire format is vLLM's NCCL weight transfer
  (vllm/distributed/weight_transfer/, 0.33): init info (master_address, master_port, rank_offset,
  world_size), update info (names, dtype_names, shapes, packed), and in packed mode each bucket is
  the parameters' bytes end to end, a bucket closing once it holds more than `BUCKET_BYTES`
  (vLLM's default packed buffer size), so one sender feeds the vLLM and the hf backend alike.

Broadcast protocol, over each server's HTTP API (`deepeyes.rollout.server`):
  1. GET /info on every server: live servers, their group id and their ranks (`weight_ranks`).
  2. If the group is missing, or a live server is not in it (it restarted), or a member is gone:
     re-form it. The leader opens the rendezvous store at MASTER_ADDR on a free port and sends
     POST /weights/init {master_address, master_port, rank_offset, world_size, group, packed} to
     each live server (`packed` is fixed for the group, as in vLLM); all join (a restarted server
     so rejoins, and gets the version this publish sends).
  3. POST /weights/pause {version, packed} to every member: each checks it can take the update,
     pauses generation and answers. Only when all have (else POST /weights/resume to those that
     did, and step 4), POST /weights/receive {version, names, dtype_names, shapes, packed} to
     every member while the leader broadcasts the buckets; each receives, then resumes.
  4. A failure (a server dying mid-broadcast or failing to pause, a timeout) tears the group
     down — the other receivers stop waiting at once — counts the server, re-forms the group with
     the live servers and sends again, once. Every wait is bounded by `timeout_s`
     (rollout.request_timeout_s, the servers' --weight-timeout-s): an error, never a hang.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import time
import uuid
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from deepeyes.service import free_port

log = logging.getLogger(__name__)

BUCKET_BYTES = 1 << 30  # vLLM's DEFAULT_PACKED_BUFFER_SIZE_BYTES: sender and receivers must agree


@dataclass(frozen=True)
class PublishedWeights:
    version: int
    path: Path
    bytes: int


def trained_state(model: torch.nn.Module, everything: bool = False) -> dict[str, torch.Tensor]:
    """The parameters an optimizer can change (with `everything`, all of them), by name."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if everything or p.requires_grad}


def publish_weights(model: torch.nn.Module, root: Path, version: int, keep: int = 2) -> PublishedWeights:
    """Write `model`'s trained parameters as `version`; keep the newest `keep` versions on disk
    (a server may still be reading the previous one)."""
    return _write(trained_state(model), root, version, keep)


def _write(tensors: dict[str, torch.Tensor], root: Path, version: int, keep: int = 2) -> PublishedWeights:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"weights_v{version:06d}.safetensors"
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata={"version": str(version)})
    os.replace(partial, path)
    for old in sorted(root.glob("weights_v*.safetensors"))[:-keep]:
        old.unlink(missing_ok=True)
    return PublishedWeights(version, path, path.stat().st_size)


def load_weights(model: torch.nn.Module, path: Path) -> int:
    """Copy published tensors into `model` in place; returns the bytes read. A name the model
    lacks, or a shape that differs, raises naming it (the server runs another model)."""
    params = dict(model.named_parameters())
    size = 0
    with torch.no_grad(), safe_open(str(path), framework="pt") as tensors:  # one tensor in memory at a time
        for name in tensors.keys():
            tensor = tensors.get_tensor(name)
            if name not in params:
                raise KeyError(f"{path}: tensor {name!r} is not a parameter of the served model")
            if params[name].shape != tensor.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the served model {tuple(params[name].shape)}")
            params[name].copy_(tensor)
            size += tensor.numel() * tensor.element_size()
    return size


# ---- the broadcast group and its wire format --------------------------------------------------


class WeightGroup:
    """A broadcast group of the trainer's leader (rank 0) and the rollout engines, apart from any
    torch.distributed default group the processes are also in."""

    def __init__(self, communicator: Any, store: Any, device: torch.device):
        self._communicator = communicator  # gloo: a ProcessGroupGloo; cuda: vLLM's PyNcclCommunicator
        self._store = store  # rank 0 hosts the rendezvous store: kept alive with the group
        self.device = device
        self._staging: torch.Tensor | None = None

    def staging(self, size: int) -> torch.Tensor:
        """A bucket of `size` bytes, reused from one bucket and one version to the next: its pages
        are touched once per job, not once per step (on a CPU that halves a bucket's cost)."""
        if self._staging is None or self._staging.numel() < size:
            self._staging = torch.empty(size, dtype=torch.uint8, device=self.device)
        return self._staging[:size]

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Rank 0's `tensor` into every rank's `tensor` (same shape and dtype on each)."""
        if self._communicator is None:
            raise RuntimeError("the weight-broadcast group was closed")
        if self.device.type == "cuda":
            self._communicator.broadcast(tensor, src=0)
            torch.cuda.current_stream().synchronize()
        else:
            options = dist.BroadcastOptions()
            options.rootRank = 0
            self._communicator.broadcast([tensor], options).wait()

    def close(self) -> None:
        """Leave the group: a peer waiting on this rank then fails at once instead of timing out
        (NCCL: vLLM's `destroy` aborts the communicator, as its own engines shut down)."""
        if self._communicator is not None and self.device.type == "cuda":
            self._communicator.destroy()
        self._communicator = self._store = self._staging = None


def join_weight_group(master_address: str, master_port: int, rank: int, world_size: int, device: torch.device,
                      timeout: timedelta) -> WeightGroup:
    """Join (rank 0: open) the weight-broadcast group; returns once all `world_size` ranks joined.

    Between GPUs the group is vLLM's own, made by the helper both sides of vLLM's NCCL weight
    transfer use (`nccl_common.stateless_init_process_group`: vLLM's `trainer_init` is this call
    with rank 0 on the current device; its workers make it with their own ranks): the same
    rendezvous, communicator and NCCL environment. The device must carry its index: vLLM's
    communicator refuses a tensor whose device is not equal to its own ("cuda" is not "cuda:0").
    Its rendezvous is bounded by vLLM's store timeout; `timeout` bounds the gloo group."""
    if device.type == "cuda":
        try:
            from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group
        except ImportError as error:
            raise ImportError(
                f"broadcast weight sync between GPUs uses vLLM's NCCL communicator: pip install 'deepeyes[gpu]', "
                f"or set rollout.weight_sync=file ({error})"
            ) from None
        index = device.index if device.index is not None else torch.accelerator.current_device_index()
        communicator = stateless_init_process_group(master_address, master_port, rank, world_size, index)
        return WeightGroup(communicator, communicator.group, torch.device("cuda", index))
    store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout)
    return WeightGroup(dist.ProcessGroupGloo(store, rank, world_size, timeout), store, device)


def update_info(tensors: dict[str, torch.Tensor], version: int, packed: bool = True) -> dict[str, Any]:
    """The receivers' half of a broadcast (vLLM's NCCLWeightTransferUpdateInfo, plus the version)."""
    return {
        "version": version, "names": list(tensors), "dtype_names": [str(t.dtype).removeprefix("torch.") for t in tensors.values()],
        "shapes": [list(t.shape) for t in tensors.values()], "packed": packed,
    }


def send_buckets(group: WeightGroup, tensors: Iterable[tuple[str, torch.Tensor]], packed: bool = True,
                 bucket_bytes: int = BUCKET_BYTES) -> int:
    """Broadcast named tensors from rank 0, in the order of the update info; returns the bytes sent."""
    sent = 0
    if not packed:
        for _, tensor in tensors:
            group.broadcast(tensor.detach().to(group.device).contiguous())
            sent += tensor.numel() * tensor.element_size()
        return sent
    def flush(pieces: list[torch.Tensor], size: int) -> None:
        bucket, offset = group.staging(size), 0
        for piece in pieces:
            bucket[offset:offset + piece.numel()].copy_(piece)
            offset += piece.numel()
        group.broadcast(bucket)

    pieces: list[torch.Tensor] = []
    size = 0
    for _, tensor in tensors:
        pieces.append(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
        size += pieces[-1].numel()
        if size > bucket_bytes:
            flush(pieces, size)
            sent, pieces, size = sent + size, [], 0
    if pieces:
        flush(pieces, size)
        sent += size
    return sent


def unaligned_in_buckets(tensors: dict[str, torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> list[str]:
    """The tensors that a packed bucket would place at a byte offset not a multiple of their element
    size. Receivers view each tensor in its bucket in place (vLLM's `unpack_tensor`, our
    `receive_buckets`), which torch refuses for those: an fp32 after an odd count of bf16
    elements, say. One dtype for every tensor never has any."""
    unaligned, offset = [], 0
    for name, tensor in tensors.items():
        if offset % tensor.element_size():
            unaligned.append(name)
        offset += tensor.numel() * tensor.element_size()
        if offset > bucket_bytes:
            offset = 0
    return unaligned


def receive_buckets(group: WeightGroup, names: list[str], dtype_names: list[str], shapes: list[list[int]],
                    packed: bool, load: Callable[[list[tuple[str, torch.Tensor]]], None],
                    into: Callable[[str, list[int], torch.dtype], torch.Tensor | None] = lambda *_: None,
                    bucket_bytes: int = BUCKET_BYTES) -> None:
    """The receiving side of `send_buckets`: `load` gets each bucket's (name, tensor) pairs as
    they arrive (views of the bucket, valid during the call). Unpacked, a tensor that `into`
    places (the parameter itself, say) is received there, with no copy and no `load`."""
    dtypes = [weight_dtype(name) for name in dtype_names]
    if not packed:
        for name, dtype, shape in zip(names, dtypes, shapes):
            target = into(name, shape, dtype)
            tensor = target if target is not None else torch.empty(shape, dtype=dtype, device=group.device)
            group.broadcast(tensor)
            if target is None:
                load([(name, tensor)])
        return
    entries: list[tuple[str, torch.dtype, list[int], int]] = []
    size = 0
    for index, (name, dtype, shape) in enumerate(zip(names, dtypes, shapes)):
        nbytes = math.prod(shape) * dtype.itemsize
        entries.append((name, dtype, shape, nbytes))
        size += nbytes
        if size > bucket_bytes or index == len(names) - 1:
            bucket = group.staging(size)
            group.broadcast(bucket)
            pieces = bucket.split([entry[3] for entry in entries])
            load([(n, piece.view(d).view(s)) for (n, d, s, _), piece in zip(entries, pieces)])
            entries, size = [], 0


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's name, dtype, shape and bytes: equal digests, equal weights."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            digest.update(f"{name}|{param.dtype}|{list(param.shape)}|".encode())
            digest.update(param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weight_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype name")
    return dtype


# ---- the trainer's side ---------------------------------------------------------------------


class WeightSync:
    """The trainer's side (`file`): after each optimizer step, publish version k+1 and have every
    rollout server load it, within a staleness bound.

    With `max_staleness=0` `publish` returns once every server serves the new version (strictly
    on-policy). With a bound b > 0 the file write and the servers' loads run in a background
    thread while the next rollout starts; `wait_for(step - b)` before a rollout makes sure no
    sample comes from weights more than b versions old (the servers also refuse such requests).
    """

    def __init__(self, client_factory, root: Path, max_staleness: int = 0):
        self._client_factory = client_factory  # a fresh RolloutClient per push: it runs on its own event loop
        self.root = root
        self.max_staleness = max_staleness
        self._pending: list[tuple[int, Future]] = []
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-sync")
        self.last_seconds = 0.0
        self.last_bytes = 0
        self.server_failures: Counter[str] = Counter()  # per server: updates it did not take

    def publish(self, model: torch.nn.Module, version: int, everything: bool = False) -> None:
        """`everything`: frozen parameters too — once at the start, so servers that loaded another
        checkpoint (the base model rather than the SFT result, say) serve exactly the trainer's."""
        snapshot = trained_state(model, everything)
        if self.max_staleness:  # written while the next update may already change the parameters
            snapshot = {name: tensor.clone() for name, tensor in snapshot.items()}
        self._pending.append((version, self._worker.submit(self._publish, snapshot, version)))
        if self.max_staleness == 0:
            self.wait_for(version)

    def wait_for(self, version: int) -> None:
        """Return once every publish up to `version` has been loaded by the servers."""
        while self._pending and self._pending[0][0] <= version:
            _, future = self._pending.pop(0)
            future.result()

    def close(self) -> None:
        try:
            self.wait_for(float("inf"))
        finally:
            self._worker.shutdown()

    def _publish(self, snapshot: dict[str, torch.Tensor], version: int) -> None:
        started = time.perf_counter()
        client = self._client_factory()

        async def push() -> int:
            try:
                return await self._push(client, snapshot, version)
            finally:
                self.server_failures.update(client.failures)
                await client.close()

        self.last_bytes = asyncio.run(push())
        self.last_seconds = time.perf_counter() - started

    async def _push(self, client, snapshot: dict[str, torch.Tensor], version: int) -> int:
        published = _write(snapshot, self.root, version)
        await client.update_weights(published.version, published.path)
        return published.bytes


class BroadcastFailed(RuntimeError):
    """A broadcast that not every member of the group completed."""


class BroadcastWeightSync(WeightSync):
    """The trainer's side (`broadcast`): the leader broadcasts each version to every rollout engine
    over a group formed once per job (re-formed when a server restarts or dies; see the module
    docstring for the protocol). Runs only on the trainer's leader."""

    def __init__(self, client_factory, master_address: str, max_staleness: int = 0, timeout_s: float = 600.0,
                 packed: bool | None = None):
        super().__init__(client_factory, root=Path(), max_staleness=max_staleness)
        self.master_address = master_address  # MASTER_ADDR of the trainer's node, where servers connect
        self.timeout = timedelta(seconds=timeout_s)
        # Packed (vLLM's choice for NCCL): few large broadcasts, at the cost of a copy into a bucket on
        # each side. Unpacked: one broadcast per tensor, received straight into the parameters by the hf
        # backend; on CPU, where a copy costs as much as the transfer, the faster (bench/weight_sync.py).
        self.packed = packed if packed is not None else torch.cuda.is_available()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.group_id: str | None = None
        self.formations = 0  # times the group was formed (1 + re-formations)
        self._group: WeightGroup | None = None
        self._members: list[str] = []

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._drop_group()

    async def _push(self, client, snapshot: dict[str, torch.Tensor], version: int) -> int:
        for attempt in (1, 2):
            try:
                await self._ensure_group(client)
                return await self._send(client, snapshot, version)
            except BroadcastFailed as error:
                self._drop_group()
                if attempt == 2:
                    raise
                log.warning("weight broadcast of version %d failed (%s); re-forming the group and sending again",
                            version, error)
        raise AssertionError("unreachable")

    async def _ensure_group(self, client) -> None:
        """Form the group anew unless every live server is in the current one and no member is gone."""
        infos = await client.post_each("/info", method="GET", timeout_s=60)
        live = [url for url, info in infos.items() if info is not None and info.get("ready")]
        if not live:
            raise BroadcastFailed(f"no rollout server is up to receive weights ({', '.join(client.urls)})")
        if self._group is not None and live == self._members and all(
                infos[url].get("weight_group") == self.group_id for url in live):
            return
        self._drop_group()
        ranks = [int(infos[url].get("weight_ranks", 1)) for url in live]
        world_size = 1 + sum(ranks)
        port = _free_port()
        group_id = uuid.uuid4().hex
        bodies, offset = {}, 1
        for url, count in zip(live, ranks):
            bodies[url] = {"master_address": self.master_address, "master_port": port, "rank_offset": offset,
                           "world_size": world_size, "group": group_id, "packed": self.packed}
            offset += count
        started = time.perf_counter()
        joining = asyncio.ensure_future(asyncio.to_thread(
            join_weight_group, self.master_address, port, 0, world_size, self.device, self.timeout))
        replies = await client.post_each("/weights/init", bodies)
        try:
            group = await asyncio.wait_for(joining, self.timeout.total_seconds())
        except Exception as error:
            raise BroadcastFailed(f"forming the weight group at {self.master_address}:{port} failed: {error}") from None
        failed = [url for url, reply in replies.items() if reply is None]
        if failed:
            group.close()
            raise BroadcastFailed(f"{', '.join(failed)} could not join the weight group")
        self._group, self._members, self.group_id = group, live, group_id
        self.formations += 1
        log.info("weight-broadcast group %s formed: trainer + %d servers (%d ranks) at %s:%d in %.2fs",
                 group_id[:8], len(live), world_size - 1, self.master_address, port, time.perf_counter() - started)

    async def _send(self, client, snapshot: dict[str, torch.Tensor], version: int) -> int:
        unaligned = unaligned_in_buckets(snapshot) if self.packed else []
        if unaligned:
            raise ValueError(f"a packed weight broadcast cannot carry {', '.join(unaligned[:3])}: they would start at "
                             f"a byte offset their dtype cannot be viewed at (mixed dtypes); publish one dtype, or "
                             f"send unpacked")
        info = update_info(snapshot, version, self.packed)
        # Every member pauses first, and the broadcast starts only once all have said so. vLLM's pause
        # (mode="wait") lets the requests in flight finish, which with max_staleness > 0 can take a
        # whole turn; had the broadcast started at once, the members already paused would sit inside
        # NCCL's receive, which has no timeout on vLLM's side, for as long as the slowest drains, and
        # for ever if one fails to pause. Pausing is bounded on each server (--weight-timeout-s);
        # only the transfer itself runs inside the collective.
        members = {url: {"version": version, "packed": self.packed} for url in self._members}
        paused = await client.post_each("/weights/pause", members)
        failed = [url for url, reply in paused.items() if reply is None]
        if failed:
            await client.post_each("/weights/resume", {url: {} for url, reply in paused.items() if reply is not None})
            raise BroadcastFailed(f"{', '.join(failed)} could not pause for version {version}")
        receiving = asyncio.ensure_future(client.post_each("/weights/receive", {url: info for url in self._members}))
        try:
            sent = await asyncio.wait_for(asyncio.to_thread(send_buckets, self._group, snapshot.items(), self.packed),
                                          self.timeout.total_seconds())
        except Exception as error:
            self._drop_group()  # the receivers still waiting fail at once, not at their timeout
            await receiving
            raise BroadcastFailed(f"sending version {version}: {type(error).__name__}: {error}") from None
        replies = await receiving
        failed = [url for url, reply in replies.items() if reply is None]
        if failed:
            raise BroadcastFailed(f"{', '.join(failed)} did not take version {version}")
        return sent

    def _drop_group(self) -> None:
        if self._group is not None:
            self._group.close()
        self._group, self._members, self.group_id = None, [], None


def _free_port() -> int:
    """A port free on every interface of this host, for the group's rendezvous store."""
    return free_port("0.0.0.0")
