"""This process's place in a depth-parallel job: which stage it is, its device, its process group.

torchrun (or ``sideways train``, which launches through the same elastic agent) starts one process
per stage and sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
rank r runs stage r.
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

from sideways_cli.config import Config
from sideways_cli.distributed.links import Links
from sideways_cli.errors import UserError
from sideways_cli.runtime import resolve_device

# waiting for rank 0 to finish its set-up (indexing a dataset can take minutes) is not a hang
STARTUP_TIMEOUT = timedelta(minutes=30)
PR_SET_PDEATHSIG = 1
STARTED_BY_SIDEWAYS = "SIDEWAYS_STAGE_OF_LAUNCHER"  # set for the stages launch.py starts


def launched() -> bool:
    """True inside a process started by torchrun or by :func:`launch.launch_stages`."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass
class StageContext:
    stage: int
    stages: int
    device: torch.device
    links: Links

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
    """Join the job's process group as the stage of this process's rank."""
    die_with_launcher()
    stages = int(os.environ["WORLD_SIZE"])
    if stages != cfg.parallel.stages:
        raise UserError(f"the launcher started {stages} processes but parallel.stages is "
                        f"{cfg.parallel.stages}; pass --set parallel.stages={stages} (or launch "
                        f"{cfg.parallel.stages} processes)")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = stage_device(cfg.device, local_rank)
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    local_stages = int(os.environ.get("LOCAL_WORLD_SIZE", stages))
    torch.set_num_threads(cfg.parallel.threads or max(1, (os.cpu_count() or 1) // local_stages))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=STARTUP_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    stage = dist.get_rank()
    return StageContext(stage, stages, device, Links(stage, stages, cfg.parallel.timeout_s, device))


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
