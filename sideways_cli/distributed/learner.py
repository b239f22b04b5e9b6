"""Stage 0's side of a P-stage run: a ``learner.Learner`` whose network is split across the
stage processes (``runner.py``), and the network evaluation sees there."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from sideways_cli.build import build_network
from sideways_cli.config import Config
from sideways_cli.distributed.balance import measure_module_costs, resolve_balance
from sideways_cli.distributed.context import StageContext
from sideways_cli.distributed.runner import (Command, CommandChannel, StageWorker, reassemble,
                                             save_shard, start)
from sideways_cli.engine.losses import OBJECTIVES
from sideways_cli.engine.rule import BatchStats
from sideways_cli.models import FrameStack
from sideways_cli.rundir import CHECKPOINTS, RunDir, save_checkpoint
from sideways_cli.runtime import Autocast, forward_autocast


class PipelinedNetwork(nn.Module):
    """What evaluation runs as the network on stage 0: its ``stream()`` takes each time chunk of a
    batch through every stage. It has no parameters of its own; ``eval()``/``train()`` are the
    stages' business."""

    def __init__(self, worker: StageWorker, commands: CommandChannel):
        super().__init__()
        self.worker, self.commands = worker, commands

    @property
    def dtype(self) -> torch.dtype:
        return self.worker.stack.dtype

    def stream(self) -> Callable[[torch.Tensor], torch.Tensor]:
        first = True

        def forward_chunk(chunk: torch.Tensor) -> torch.Tensor:
            nonlocal first
            self.commands.send(Command.EVAL, int(first))
            y = self.worker.evaluate_chunk(chunk, first)
            first = False
            return y

        return forward_chunk


class DistributedLearner:
    """The network split into ``parallel.stages`` stages, this process running the first."""

    def __init__(self, cfg: Config, ctx: StageContext, num_classes: int, run: RunDir, resume: bool):
        autocast = forward_autocast(ctx.device, cfg.amp)
        sizes = stage_sizes(cfg, build_network(cfg, num_classes), ctx.device, autocast)
        if ctx.across is not None:  # every replica splits the network as replica 0 measured it
            sizes = ctx.across.gather(sizes, "agreeing on the stages' sizes")[0]
        start(ctx, {"classes": num_classes, "sizes": sizes, "out_dir": str(run.path),
                    "resume": str(run.checkpoint()) if resume else None})
        self.cfg, self.ctx, self.run = cfg, ctx, run
        self.worker = StageWorker(cfg, ctx, num_classes, sizes)
        self.commands = CommandChannel(ctx)
        self.model = PipelinedNetwork(self.worker, self.commands)

    @property
    def lr(self) -> float:
        return self.worker.optimizer.param_groups[0]["lr"]

    def train_batch(self, clips: torch.Tensor, labels: torch.Tensor) -> BatchStats:
        self.commands.send(Command.TRAIN, *clips.shape)
        stats = self.worker.train_batch(clips, labels, clips.shape)
        return stats if self.ctx.across is None else self.ctx.across.batch_stats(stats)

    def save(self, path: Path, payload: dict[str, Any]) -> None:
        """Every stage writes its shard; stage 0 then reassembles them into ``path`` (with
        replicas, replica 0's stages write, from every replica's registers)."""
        which = path.stem
        self.commands.send(Command.SAVE, CHECKPOINTS.index(which))
        save_shard(self.worker, self.run, which)
        if self.ctx.replica != 0:
            return
        paths = [self.run.stage_shard(which, s) for s in range(self.ctx.stages)]
        shards = [torch.load(p, map_location=self.ctx.device, weights_only=False) for p in paths]
        learner = reassemble(shards, self.cfg)
        ckpt = {"model": learner["model"], "optimizer": learner["optimizer"],
                "schedule": learner["schedule"], **payload}
        if "resume" in payload:
            ckpt["resume"] = {**payload["resume"], "rule": learner["rule"],
                              "stage_rng": learner["stage_rng"]}
        save_checkpoint(ckpt, path)
        for p in paths:  # reassembled: the ordinary file is the checkpoint from now on
            p.unlink()

    def load(self, ckpt: dict[str, Any]) -> None:
        self.worker.load(ckpt)

    def peaks_mb(self, own_mb: float) -> list[float]:
        """Each stage's peak memory so far, bottom stage first, given this (the first) stage's;
        with replicas, each stage's largest over them."""
        self.commands.send(Command.MEMORY)
        peaks = self.worker.gather_peaks(own_mb)
        if self.ctx.across is None:
            return peaks
        return self.ctx.across.largest(peaks, "gathering the replicas' peak memory")

    def close(self) -> None:
        self.commands.send(Command.STOP)


def stage_sizes(cfg: Config, model: FrameStack, device: torch.device, autocast: Autocast) -> list[int]:
    """Modules per stage: ``parallel.balance`` as given, or split by measured per-module cost."""
    costs = None
    if cfg.parallel.balance == "auto":
        frame = (cfg.data.batch_size, 3, cfg.data.size, cfg.data.size)
        costs = measure_module_costs(model.to(device), frame, device=device, autocast=autocast,
                                     objective=OBJECTIVES[cfg.task]).total_s
    return resolve_balance(cfg.parallel.balance, cfg.parallel.stages, len(model), costs, model.names)
