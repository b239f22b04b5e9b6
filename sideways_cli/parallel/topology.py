"""The job's topology: replicas x stages processes, this process's place in it, its device and the
process groups it talks over. Every process of a job builds the same one and runs the same loop
(``train.py``); a single process is the 1 x 1 case and needs no torch.distributed at all.

torchrun (or ``sideways train``, which launches through the same elastic agent) starts one process
per stage of every replica and sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT. The layout, in one place (:func:`join`): rank r is stage r % P of replica r // P, so a
replica's stages are consecutive ranks (on one node with enough GPUs). Global rank 0, replica 0's
first stage, is the one that logs and writes the run's shared files.

The groups, and why each exists (NCCL runs a process's operations on one group one after another,
in the order they were issued, and ignores tags):

- ``up`` and ``down``, per replica: activations go up on one, gradient messages down on the other.
  A stage posts its receive from a neighbour before it sends to that neighbour; on one shared group
  each receive would wait behind the other side's, forever. With a group per direction, every
  group carries traffic one way only, and in-order execution can never cycle;
- ``pipeline``, per replica: its stages' collectives (an evaluation's metrics);
- ``across``, per stage: that stage of every replica, which averages its gradients;
- ``pipelined_bp``, per replica, pipelined BP only: torch.distributed.pipelining's own traffic;
- the default group: the whole job (a batch's statistics, peak memory, start-up and checkpoint
  barriers).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, NoReturn

import torch
import torch.distributed as dist

from sideways_cli.config import Config
from sideways_cli.engine.rule import BatchStats, LossSum
from sideways_cli.parallel.contribution import Contribution
from sideways_cli.parallel.links import Links, StageFailure, bounded_wait, why_silent
from sideways_cli.parallel.replicas import ReplicaGroup
from sideways_cli.support.errors import UserError
from sideways_cli.support.runtime import resolve_device
from sideways_cli.support.stop_signals import STOP_SIGNALS

# Waits that are not a step's: rank 0 indexing a dataset, an evaluation, a checkpoint being written
PATIENT = timedelta(minutes=30)
HANG_TIMEOUT_S = {"cpu": 20.0, "cuda": 300.0}  # parallel.timeout_s when unset
PR_SET_PDEATHSIG = 1
STARTED_BY_SIDEWAYS = "SIDEWAYS_STAGE_OF_LAUNCHER"  # set for the stages launch.py starts
BACKENDS = {"cuda": "nccl", "cpu": "gloo"}


def launched() -> bool:
    """True inside a process started by torchrun or by :func:`launch.launch`."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def hang_timeout_s(cfg: Config, device: torch.device) -> float:
    """How long a neighbour may stay silent in the middle of a step: ``parallel.timeout_s``, or
    the device's default."""
    if cfg.parallel.timeout_s is not None:
        return cfg.parallel.timeout_s
    return HANG_TIMEOUT_S.get(device.type, HANG_TIMEOUT_S["cuda"])


@dataclass
class Topology:
    """Replica ``replica`` of ``replicas``, stage ``stage`` of ``stages``, on ``device``.

    ``links``: the traffic to the replica's other stages (None with one stage); ``across``: this
    stage of every replica (None with one replica); ``pipelined_bp``: pipelined BP's group of the
    replica's stages (see the module's docstring)."""

    device: torch.device
    replicas: int = 1
    stages: int = 1
    replica: int = 0
    stage: int = 0
    hang_timeout_s: float = HANG_TIMEOUT_S["cpu"]
    links: Links | None = None
    across: ReplicaGroup | None = None
    pipelined_bp: dist.ProcessGroup | None = field(default=None, repr=False)

    @property
    def distributed(self) -> bool:
        return self.replicas * self.stages > 1

    @property
    def rank(self) -> int:
        return self.replica * self.stages + self.stage

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    @property
    def is_writer(self) -> bool:
        """Global rank 0: the one process that logs and writes the run's shared files."""
        return self.rank == 0

    @property
    def reports_to_parent(self) -> bool:
        """Started by ``sideways train``'s own launcher, which prints the summary itself."""
        return os.environ.get(STARTED_BY_SIDEWAYS) == "1"

    def name(self, rank: int | None = None) -> str:
        """How messages call the process of global rank ``rank`` (default: this one)."""
        return process_name(self.rank if rank is None else rank, self.replicas, self.stages)

    def barrier(self, doing: str, timeout: timedelta = PATIENT) -> None:
        """Every process of the job reaches this point (a no-op for a single process)."""
        if self.distributed:
            self._wait(lambda: dist.barrier(async_op=True), doing, timeout)

    def reduce_(self, tensor: torch.Tensor, op: dist.ReduceOp, doing: str) -> torch.Tensor:
        """``tensor`` reduced over every process of the job, in place (within the hang timeout)."""
        if self.distributed:
            self._wait(lambda: dist.all_reduce(tensor, op=op, async_op=True), doing,
                       timeout=timedelta(seconds=self.hang_timeout_s))
        return tensor

    def from_writer(self, obj: Any, doing: str) -> Any:
        """Global rank 0's ``obj`` (picklable plain data), on every process."""
        return self.broadcast_object(obj, 0, None, doing) if self.distributed else obj

    def broadcast_object(self, obj: Any, src: int, group: dist.ProcessGroup | None,
                         doing: str) -> Any:
        """Global rank ``src``'s ``obj`` (picklable plain data) on every member of ``group``
        (None: the job), waiting as long as the group's patient timeout."""
        box = [obj]
        # NCCL moves the pickled bytes as tensors on this process's GPU; gloo on the CPU
        device = self.device if self.device.type == "cuda" else None
        try:
            dist.broadcast_object_list(box, src=src, group=group, device=device)
        except RuntimeError as exc:
            raise self.failure(doing, exc, PATIENT) from None
        return box[0]

    def batch_stats(self, contribution: Contribution) -> tuple[BatchStats, int]:
        """A batch's statistics over the whole job from every process's contribution, and the
        stop signal any process received (0: none; the first of STOP_SIGNALS when several): one
        collective and one read of the device (the batch's only host sync)."""
        c = contribution
        stops = [float(c.stop == signum) for signum in STOP_SIGNALS]
        totals = torch.tensor([0.0, c.losses.count, c.frames, *stops, *map(float, c.flushes)],
                              dtype=torch.float64, device=self.device)
        if c.losses.total is not None:
            totals[0] = c.losses.total
        self.reduce_(totals, dist.ReduceOp.SUM, "summing the batch's losses")
        totals = totals.cpu()
        flags = 3 + len(STOP_SIGNALS)
        received = [signum for signum, n in zip(STOP_SIGNALS, totals[3:flags].tolist()) if n > 0]
        return (BatchStats(LossSum(totals[0], int(totals[1])), frames=int(totals[2]),
                           updates=int((totals[flags:] > 0).sum()), replicas=self.replicas),
                int(received[0]) if received else 0)

    def peaks_mb(self, own_mb: float) -> list[float]:
        """Each stage's peak memory (MiB), bottom first, given this process's: with replicas,
        each stage's largest over them."""
        peaks = torch.zeros(self.stages, dtype=torch.float64, device=self.device)
        peaks[self.stage] = own_mb
        return self.reduce_(peaks, dist.ReduceOp.MAX, "gathering the peak memory").tolist()

    def _wait(self, start: Callable[[], dist.Work], doing: str, timeout: timedelta) -> None:
        bounded_wait(start, timeout, lambda exc, waited: self.failure(doing, exc, waited))

    def failure(self, doing: str, exc: BaseException | None, timeout: timedelta) -> StageFailure:
        """A collective of the whole job failed; the backend does not say who is silent, unless
        there are two of us."""
        other = self.name(1 - self.rank) if self.replicas * self.stages == 2 else "another process"
        return StageFailure(f"{self.name()}, {doing}: {why_silent(other, exc, timeout)}")


def process_name(rank: int, replicas: int, stages: int) -> str:
    """How messages call the process of global rank ``rank``."""
    replica, stage = divmod(rank, stages)
    return f"stage {stage}" if replicas == 1 else f"replica {replica} stage {stage}"


def single(cfg: Config) -> Topology:
    """The 1 x 1 job: this process alone, on the config's device."""
    device = resolve_device(cfg.device)
    return Topology(device, hang_timeout_s=hang_timeout_s(cfg, device))


def die_with_launcher() -> None:
    """Linux: end this stage when its launcher ends, even by SIGKILL, which gives the launcher no
    chance to stop its stages (they run in sessions of their own)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher was gone before the line above
        os._exit(1)


def join(cfg: Config) -> Topology:
    """Join the job as the replica and stage of this process's rank; every process creates every
    group, in the same order (torch requires it)."""
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
    backend = job_backend(cfg.parallel.backend, device)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(cfg.parallel.threads or max(1, (os.cpu_count() or 1) // local_world))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _init_process_group(backend, device)
    return make_topology(replicas, stages, device, hang_timeout_s(cfg, device),
                         pipelined_bp=cfg.mode == "bp" and stages > 1)


def make_topology(replicas: int, stages: int, device: torch.device, hang_s: float,
                  pipelined_bp: bool = False) -> Topology:
    """This process's topology in an initialised default group of ``replicas`` x ``stages``
    processes; every process creates every group, in the same order (torch requires it)."""
    replica, stage = divmod(dist.get_rank(), stages)
    hang = timedelta(seconds=hang_s)
    ranks = torch.arange(replicas * stages).view(replicas, stages).tolist()
    # Waits this code bounds itself (every collective it issues; point-to-point on the CPU) run in
    # groups with the patient timeout, so that the backend never ends them first. Waits only the
    # backend can bound get the hang timeout: DistributedDataParallel's all_reduce, pipelined BP's
    # schedule, and on CUDA the links, whose receives the compute stream waits for without
    # blocking the host (NCCL's watchdog then ends a hung exchange).
    p2p = hang if device.type == "cuda" else PATIENT
    mine: dict[str, dist.ProcessGroup] = {}
    for r, members in enumerate(ranks):
        groups = {"pipeline": dist.new_group(members, timeout=PATIENT, group_desc="pipeline"),
                  "up": dist.new_group(members, timeout=p2p, group_desc="up"),
                  "down": dist.new_group(members, timeout=p2p, group_desc="down")}
        if pipelined_bp:
            groups["pipelined_bp"] = dist.new_group(members, timeout=hang, group_desc="pipelined_bp")
        if r == replica:
            mine = groups
    across = [dist.new_group([row[s] for row in ranks], timeout=hang, group_desc="across")
              for s in range(stages)]
    topology = Topology(device, replicas, stages, replica, stage, hang_s,
                        pipelined_bp=mine.get("pipelined_bp"))
    if stages > 1:
        topology.links = Links(stage, stages, hang_s, device, ranks=ranks[replica],
                               up=mine["up"], down=mine["down"], pipeline=mine["pipeline"],
                               replica=replica if replicas > 1 else None)
    if replicas > 1:
        topology.across = ReplicaGroup(across[stage], replica, replicas, stage, stages, hang_s,
                                       device)
    return topology


def job_backend(asked: str, device: torch.device) -> str:
    """The torch.distributed backend for tensors on ``device``: NCCL moves CUDA tensors, gloo the
    CPU's (its point-to-point moves no CUDA tensors)."""
    wanted = BACKENDS.get(device.type)
    if wanted is None:
        raise UserError(f"parallel jobs run on cuda or cpu, not {device.type!r}; set device")
    if asked not in ("auto", wanted):
        raise UserError(f"config key 'parallel.backend' is {asked} but the stages run on "
                        f"{device.type}, whose tensors only {wanted} moves; set "
                        f"parallel.backend={wanted} or auto")
    return wanted


def _init_process_group(backend: str, device: torch.device) -> None:
    """The default group, over a store whose keys are this attempt's own.

    torchrun's elastic agent hands every restart of the workers the same store (its rendezvous
    store, MASTER_ADDR:MASTER_PORT), so a restarted process could read the address a dead one
    published under the same key and fail to connect. Prefixing every key with the restart count
    (TORCHELASTIC_RESTART_COUNT) keeps the attempts apart; every group made later shares it."""
    store, rank, world = next(dist.rendezvous("env://", timeout=PATIENT))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"sideways/attempt_{attempt}/", store),
                            rank=rank, world_size=world, timeout=PATIENT,
                            device_id=device if device.type == "cuda" else None)


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


def end_process(code: int | str | None) -> NoReturn:
    """Exit with ``code``. A process of a job that has left its group (or never joined it) skips
    the interpreter's finalization: it would tear down gloo's and the store's threads in whatever
    order it meets them (which has aborted a finished worker: "terminate called without an active
    exception", a failure the launcher would report) and spend about a CPU second per process on
    freeing what the exit frees anyway. Everything the run wrote was closed when it ended: its
    loaders' workers are joined, its files written atomically; only the streams are flushed here."""
    if not launched() or dist.is_initialized():
        sys.exit(code)
    if isinstance(code, str):  # sys.exit's message form
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
