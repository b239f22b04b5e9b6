"""This process's place in a parallel job: which replica and stage it is, its device, its groups.

torchrun (or ``sideways train``, which launches through the same elastic agent) starts one process
per stage of every replica, ``parallel.replicas`` x ``parallel.stages`` in all, and sets RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. The layout, in one place
(:func:`join`): rank r is stage r % P of replica r // P, so a replica's stages are consecutive ranks
(on one node with enough GPUs); the job is a 2-D DeviceMesh ("replica", "stage"): along "stage",
one replica's pipeline (its links and commands); along "replica", one stage of every replica (its
gradient averaging). Global rank 0, replica 0's first stage, logs, evaluates (gathering every
replica's share) and writes the run directory; every replica's first stage loads its data.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from sideways_cli.config import Config
from sideways_cli.distributed.links import Links
from sideways_cli.distributed.replicas import ReplicaGroup
from sideways_cli.errors import UserError
from sideways_cli.runtime import resolve_device

# waiting for rank 0 to finish its set-up (indexing a dataset can take minutes) is not a hang
STARTUP_TIMEOUT = timedelta(minutes=30)
PR_SET_PDEATHSIG = 1
STARTED_BY_SIDEWAYS = "SIDEWAYS_STAGE_OF_LAUNCHER"  # set for the stages launch.py starts


def launched() -> bool:
    """True inside a process started by torchrun or by :func:`launch.launch`."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass
class StageContext:
    """Stage ``stage`` of ``stages`` of replica ``replica``; ``links`` to its replica's other
    stages; ``across``: this stage of every replica (None with a single replica)."""

    stage: int
    stages: int
    device: torch.device
    links: Links
    replica: int = 0
    replicas: int = 1
    across: ReplicaGroup | None = None
    mesh: DeviceMesh | None = None
    leaders: dist.ProcessGroup | None = None  # every replica's first stage, with start-up patience
    # pipelined BP: the replica's stages, waiting parallel.timeout_s at most (see join)
    schedule_group: dist.ProcessGroup | None = None

    @property
    def reports_to_parent(self) -> bool:
        """Started by ``sideways train``'s own launcher, which prints the summary itself."""
        return os.environ.get(STARTED_BY_SIDEWAYS) == "1"

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    @property
    def is_writer(self) -> bool:
        """Global rank 0: the one process that logs and writes the run directory."""
        return self.replica == 0 and self.stage == 0


def die_with_launcher() -> None:
    """Linux: end this stage when its launcher ends, even by SIGKILL, which gives the launcher no
    chance to stop its stages (they run in sessions of their own)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher was gone before the line above
        os._exit(1)


def join(cfg: Config) -> StageContext:
    """Join the job as the replica and stage of this process's rank."""
    die_with_launcher()
    world = int(os.environ["WORLD_SIZE"])
    replicas, stages = cfg.parallel.replicas, cfg.parallel.stages
    if world != replicas * stages:
        started = f"{world} process" + "es" * (world != 1)
        raise UserError(f"the launcher started {started} but parallel.replicas x parallel.stages is "
                        f"{replicas} x {stages} = {replicas * stages}; launch "
                        f"{replicas * stages} (torchrun --nproc-per-node {replicas * stages} on one "
                        f"node), or set parallel.replicas and parallel.stages to multiply to {world}")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = stage_device(cfg.device, local_rank)
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(cfg.parallel.threads or max(1, (os.cpu_count() or 1) // local_world))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _init_process_group(backend, device)
    replica, stage = divmod(dist.get_rank(), stages)
    # torch.distributed.pipelining waits on its sends and receives with no timeout of its own, so
    # only its group's bounds them: parallel.timeout_s, where the other groups have the start-up's
    # patience. Every process creates every group, in the same order.
    schedules = None
    if cfg.mode == "bp" and stages > 1:
        timeout = timedelta(seconds=cfg.parallel.timeout_s)
        schedules = [dist.new_group(list(range(r * stages, (r + 1) * stages)), timeout=timeout)
                     for r in range(replicas)]
    if replicas == 1:  # the whole job is one pipeline: the default group
        links = Links(stage, stages, cfg.parallel.timeout_s, device)
        ctx = StageContext(stage, stages, device, links)
    else:
        ctx = _mesh_context(cfg, replica, stage, device)
    ctx.schedule_group = schedules[replica] if schedules else None
    return ctx


def _init_process_group(backend: str, device: torch.device) -> None:
    """The default group, over a store whose keys are this attempt's own.

    torchrun's elastic agent hands every restart of the workers the same store (its rendezvous
    store, MASTER_ADDR:MASTER_PORT), so a restarted process could read the address a dead one
    published under the same key and fail to connect. Prefixing every key with the restart count
    (TORCHELASTIC_RESTART_COUNT) keeps the attempts apart; every group made later shares it."""
    store, rank, world = next(dist.rendezvous("env://", timeout=STARTUP_TIMEOUT))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"sideways/attempt_{attempt}/", store),
                            rank=rank, world_size=world, timeout=STARTUP_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)


def _mesh_context(cfg: Config, replica: int, stage: int, device: torch.device) -> StageContext:
    """The groups of R > 1 replicas: every process creates every group, in the same order.
    Replica groups wait ``parallel.timeout_s`` at most (their collectives include DDP's, which
    nothing else bounds); a replica's stages wait as its links say."""
    replicas, stages = cfg.parallel.replicas, cfg.parallel.stages
    ranks = torch.arange(replicas * stages).view(replicas, stages)
    pipelines = [dist.new_group(ranks[r].tolist(), timeout=STARTUP_TIMEOUT) for r in range(replicas)]
    timeout = timedelta(seconds=cfg.parallel.timeout_s)
    across = [dist.new_group(ranks[:, s].tolist(), timeout=timeout) for s in range(stages)]
    leaders = dist.new_group(ranks[:, 0].tolist(), timeout=STARTUP_TIMEOUT)
    mesh = DeviceMesh.from_group([across[stage], pipelines[replica]], device.type, mesh=ranks,
                                 mesh_dim_names=("replica", "stage"))
    links = Links(stage, stages, cfg.parallel.timeout_s, device, ranks=ranks[replica].tolist(),
                  group=mesh.get_group("stage"), replica=replica)
    group = ReplicaGroup(mesh.get_group("replica"), replica, replicas, stage, stages,
                         cfg.parallel.timeout_s, device)
    return StageContext(stage, stages, device, links, replica, replicas, group, mesh,
                        leaders if stage == 0 else None)


def stage_device(name: str, local_rank: int) -> torch.device:
    """One device per stage process on a GPU machine (the local rank's), the CPU otherwise."""
    device = resolve_device(name)
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"stage with local rank {local_rank} has no GPU of its own "
                        f"({torch.cuda.device_count()} visible); launch at most that many "
                        "stages per node")
    return torch.device("cuda", local_rank)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
