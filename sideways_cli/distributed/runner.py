"""One process per stage: the first runs the ordinary training loop (data, logs, evaluation,
checkpoints) and tells the others what to do next; each stage owns its modules' weights,
optimizer and schedule.

The first stage broadcasts one small command per step (train a batch of this shape, evaluate a
batch, save a shard, stop); the work itself flows stage to stage (``links.py``). The others never
touch the dataset or the run directory, except to write their checkpoint shards.
"""

from __future__ import annotations

import enum
import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sideways_cli.config import Config
from sideways_cli.distributed.context import STARTUP_TIMEOUT, StageContext
from sideways_cli.distributed.shards import (batched_for_stage, merge_batched, merge_optimizers,
                                             merge_sideways, model_state_for_stage,
                                             model_state_to_network, optimizer_for_stage,
                                             sideways_for_stage)
from sideways_cli.distributed.stages import output_specs, stage_ranges, stage_stack
from sideways_cli.distributed.staged_batched import StagedTickBatched
from sideways_cli.distributed.staged_sideways import StagedSideways
from sideways_cli import engine
from sideways_cli.engine.losses import OBJECTIVES
from sideways_cli.engine.rule import BatchStats
from sideways_cli.memory import PeakMemory
from sideways_cli.runtime import forward_autocast

TARGET_TAG, EVAL_TAG = 1, 2  # links' tags besides the ticks' (staged_sideways.TICK_TAG)
_COMMAND_SLOTS = 8


class Op(enum.IntEnum):
    TRAIN = 1  # args: the batch shape B, C, T, H, W
    EVAL = 2  # args: 1 for an evaluation batch's first time chunk, else 0
    SAVE = 3  # args: which checkpoint (index into CHECKPOINTS)
    STOP = 4
    MEMORY = 5  # every stage reports its peak memory so far


CHECKPOINTS = ("last", "best")


def shard_path(out_dir: Path, which: str, stage: int) -> Path:
    return out_dir / "checkpoints" / "stages" / f"{which}-stage{stage}.pt"


class StageWorker:
    """What every stage process holds: its modules, optimizer, schedule and rule."""

    def __init__(self, cfg: Config, ctx: StageContext, num_classes: int, sizes: list[int]):
        from sideways_cli.train import build_network, make_optimizer, make_schedule

        self.cfg, self.ctx = cfg, ctx
        model = build_network(cfg, num_classes)  # the whole network from the seed, as one process
        ranges = stage_ranges(sizes)
        self.modules = ranges[ctx.stage]
        self.counts = [len(list(stage_stack(model, r).parameters())) for r in ranges]
        self.stack = stage_stack(model, self.modules).to(ctx.device)
        self.autocast = forward_autocast(ctx.device, cfg.amp)
        self.optimizer = make_optimizer(cfg.train, self.stack)
        self.schedule = make_schedule(cfg.train, self.optimizer)
        self.objective = OBJECTIVES[cfg.task]
        self.eval_stream = None  # the causal pass over the evaluation batch in progress
        if cfg.mode == "sideways":
            specs = output_specs(model, (3, cfg.data.size, cfg.data.size), self.autocast, "cpu")
            stage = (self.stack, self.modules, len(model), ctx, specs, cfg.sideways.pipeline)
            if batches_ticks(cfg):
                self.rule: Any = StagedTickBatched(*stage, cfg.sideways.chunk, self.objective,
                                                   self.autocast)
            else:
                self.rule = StagedSideways(*stage, cfg.sideways.update, self.objective, self.autocast)
        else:
            from sideways_cli.distributed.pipelined_bp import PipelinedBackprop

            self.rule = PipelinedBackprop(self.stack, ctx.stage, ctx.stages, cfg.parallel.schedule,
                                          cfg.parallel.microbatches, self.objective, ctx.device,
                                          self.autocast)

    def apply_update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_batch(self, clips: torch.Tensor | None, labels: torch.Tensor | None,
                    shape: torch.Size) -> BatchStats:
        """The first stage passes its clips; the last receives its targets from it first."""
        links, ctx = self.ctx.links, self.ctx
        needs_clips = self.cfg.task == "reconstruct"
        if ctx.is_first:
            links.send(labels, ctx.stages - 1, TARGET_TAG)
            if needs_clips:
                links.send(clips, ctx.stages - 1, TARGET_TAG)
        elif ctx.is_last:
            labels = links.receive((shape[0],), torch.int64, 0, "the batch's labels", TARGET_TAG).wait()
            if needs_clips:
                clips = links.receive(shape, self.stack.dtype, 0, "the batch's clips", TARGET_TAG).wait()
        if self.cfg.mode == "sideways":
            stats = self.rule.train_batch(clips, labels, self.apply_update, shape)
        else:
            stats = self.rule.train_batch(clips, labels, self.apply_update)
            stats = self._reduce_loss(stats)
        links.settle()
        self.schedule.step()
        return stats

    def _reduce_loss(self, stats: BatchStats) -> BatchStats:
        totals = torch.tensor([stats.loss * stats.losses, stats.losses], dtype=torch.float64,
                              device=self.ctx.device)
        self.ctx.links.all_reduce(totals, "summing the batch's loss")
        losses = int(totals[1].item())
        return BatchStats(totals[0].item() / max(losses, 1), losses, stats.frames, stats.updates)

    @torch.no_grad()
    def evaluate_chunk(self, clips: torch.Tensor | None, first: bool) -> torch.Tensor | None:
        """The stage's modules over the next time chunk of an evaluation batch (the causal network,
        property 1, a chunk at a time: ``first`` starts a batch's windows from zeros); the first
        stage sends the chunk's activations up and gets the network's outputs back from the last."""
        links, ctx = self.ctx.links, self.ctx
        x = clips if ctx.is_first else links.receive_sized(ctx.stage - 1, "an evaluation batch", EVAL_TAG)
        if first:
            self.eval_stream = self.stack.stream()
        self.stack.eval()
        with self.autocast():
            y = self.eval_stream(x)
        self.stack.train()
        links.send_sized(y, (ctx.stage + 1) % ctx.stages, EVAL_TAG)
        if ctx.is_first:
            y = links.receive_sized(ctx.stages - 1, "the network's outputs", EVAL_TAG)
        links.settle()
        return y if ctx.is_first else None

    def gather_peaks(self, own_mb: float) -> list[float]:
        """Every stage's peak memory (MiB), given this stage's: one all_reduce over a slot each."""
        peaks = torch.zeros(self.ctx.stages, dtype=torch.float64, device=self.ctx.device)
        peaks[self.ctx.stage] = own_mb
        self.ctx.links.all_reduce(peaks, "gathering the stages' peak memory")
        return peaks.tolist()

    def shard(self) -> dict[str, Any]:
        return {"stage": self.ctx.stage, "modules": (self.modules.start, self.modules.stop),
                "model": model_state_to_network(self.stack.state_dict(), self.modules),
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "rule": self.rule.state_dict(), "rng": torch.get_rng_state()}

    def load(self, ckpt: dict[str, Any]) -> None:
        """This stage's share of an ordinary (single-process) checkpoint."""
        self.stack.load_state_dict(model_state_for_stage(ckpt["model"], self.modules))
        self.optimizer.load_state_dict(optimizer_for_stage(ckpt["optimizer"], self.counts, self.ctx.stage))
        self.schedule.load_state_dict(ckpt["schedule"])
        from sideways_cli.train import carried_rule_state

        layout = "registers" if batches_ticks(self.cfg) else "pipeline"
        rule = carried_rule_state(ckpt["resume"]["rule"], layout, self.cfg)
        if rule is not None:
            if self.cfg.mode == "sideways":
                for_stage = batched_for_stage if layout == "registers" else sideways_for_stage
                rule = for_stage(rule, self.modules, self.ctx.stage, self.ctx.stages)
            self.rule.load_state_dict(rule)
        stage_rng = ckpt["resume"].get("stage_rng")
        if stage_rng is not None and not self.ctx.is_first:
            torch.set_rng_state(stage_rng[self.ctx.stage].cpu())


def batches_ticks(cfg: Config) -> bool:
    """Whether Sideways stages run the chunked executor, as one process would (``make_rule``)."""
    return cfg.mode == "sideways" and engine.batches_ticks(cfg.sideways.update, cfg.sideways.chunk)


def reassemble(shards: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """The ordinary checkpoint's learner part from the stages' shards, bottom stage first."""
    model: dict[str, Any] = {}
    for shard in shards:
        model.update(shard["model"])
    rules = [shard["rule"] for shard in shards]
    rule: dict[str, Any] = {}
    if cfg.mode == "sideways":
        rule = merge_batched(rules) if batches_ticks(cfg) else merge_sideways(rules)
    return {"model": model, "optimizer": merge_optimizers([s["optimizer"] for s in shards]),
            "schedule": shards[0]["schedule"], "rule": rule,
            "stage_rng": [shard["rng"] for shard in shards]}


class Commands:
    """The first stage's one-way control channel to the others: a fixed-size int64 broadcast."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.first_wait = True

    def send(self, op: Op, *args: int) -> None:
        command = torch.zeros(_COMMAND_SLOTS, dtype=torch.int64, device=self.ctx.device)
        command[0] = op
        command[1:1 + len(args)] = torch.tensor(args, dtype=torch.int64)
        self._broadcast(command, "sending a command")

    def receive(self) -> tuple[Op, list[int]]:
        command = torch.zeros(_COMMAND_SLOTS, dtype=torch.int64, device=self.ctx.device)
        self._broadcast(command, "waiting for stage 0's next command")
        values = command.tolist()
        return Op(values[0]), values[1:]

    def _broadcast(self, command: torch.Tensor, doing: str) -> None:
        links = self.ctx.links
        try:
            work = dist.broadcast(command, src=0, async_op=True)
        except RuntimeError as exc:
            raise links.failure(0, doing, exc) from None
        # the first command may wait for stage 0 to load its first batch
        links.wait(work, 0, doing, STARTUP_TIMEOUT if self.first_wait else None)
        self.first_wait = False


def start(ctx: StageContext, setup: dict[str, Any] | None = None) -> dict[str, Any]:
    """Stage 0 tells every stage how to build itself (classes, balance, checkpoint to resume)."""
    box = [setup]
    dist.broadcast_object_list(box, src=0)  # the process group's start-up timeout
    return box[0]


def follow(cfg: Config, ctx: StageContext) -> None:
    """The loop of every stage but the first: build, then do what stage 0 says until STOP."""
    setup = start(ctx)
    if setup.get("finished"):
        return
    worker = StageWorker(cfg, ctx, setup["classes"], setup["sizes"])
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + ctx.stage)  # this stage's own stream (dropout), reproducible
    if setup["resume"] is not None:
        worker.load(torch.load(setup["resume"], map_location=ctx.device, weights_only=False))
    commands = Commands(ctx)
    with PeakMemory(ctx.device) as memory:  # from the same point as the first stage's (train.py)
        while True:
            op, args = commands.receive()
            if op == Op.STOP:
                return
            if op == Op.TRAIN:
                worker.train_batch(None, None, torch.Size(args[:5]))
            elif op == Op.EVAL:
                worker.evaluate_chunk(None, bool(args[0]))
            elif op == Op.SAVE:
                save_shard(worker, Path(setup["out_dir"]), CHECKPOINTS[args[0]])
            elif op == Op.MEMORY:
                worker.gather_peaks(memory.read())


def save_shard(worker: StageWorker, out_dir: Path, which: str) -> None:
    from sideways_cli.train import save_atomic

    path = shard_path(out_dir, which, worker.ctx.stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(worker.shard(), path)
    done = torch.ones(1, device=worker.ctx.device)  # a barrier with a timeout
    worker.ctx.links.all_reduce(done, f"saving the {which} checkpoint")


class PipelinedNetwork(nn.Module):
    """What evaluation calls as the network on stage 0: its ``stream()`` runs each time chunk of a
    batch through every stage. It has no parameters of its own; ``eval()``/``train()`` are the
    stages' business."""

    def __init__(self, worker: StageWorker, commands: Commands):
        super().__init__()
        self.worker, self.commands = worker, commands

    @property
    def dtype(self) -> torch.dtype:
        return self.worker.stack.dtype

    def stream(self):
        first = True

        def forward_chunk(chunk: torch.Tensor) -> torch.Tensor:
            nonlocal first
            self.commands.send(Op.EVAL, int(first))
            y = self.worker.evaluate_chunk(chunk, first)
            first = False
            return y

        return forward_chunk


class DistributedLearner:
    """Stage 0's side of a P-stage run, with the interface of ``train.LocalLearner``."""

    def __init__(self, cfg: Config, ctx: StageContext, num_classes: int, sizes: list[int],
                 out_dir: Path, resume: Path | None):
        start(ctx, {"classes": num_classes, "sizes": sizes, "resume": str(resume) if resume else None,
                    "out_dir": str(out_dir)})
        self.cfg, self.ctx, self.out_dir = cfg, ctx, out_dir
        self.worker = StageWorker(cfg, ctx, num_classes, sizes)
        self.commands = Commands(ctx)
        self.model = PipelinedNetwork(self.worker, self.commands)
        self.rule = self.worker.rule

    @property
    def lr(self) -> float:
        return self.worker.optimizer.param_groups[0]["lr"]

    def train_batch(self, clips: torch.Tensor, labels: torch.Tensor) -> BatchStats:
        self.commands.send(Op.TRAIN, *clips.shape)
        return self.worker.train_batch(clips, labels, clips.shape)

    def save(self, path: Path, payload: dict[str, Any]) -> None:
        """Every stage writes its shard; stage 0 then reassembles them into ``path``."""
        from sideways_cli.train import save_atomic

        which = path.stem
        self.commands.send(Op.SAVE, CHECKPOINTS.index(which))
        save_shard(self.worker, self.out_dir, which)
        paths = [shard_path(self.out_dir, which, s) for s in range(self.ctx.stages)]
        shards = [torch.load(p, map_location=self.ctx.device, weights_only=False) for p in paths]
        learner = reassemble(shards, self.cfg)
        ckpt = {"model": learner["model"], "optimizer": learner["optimizer"],
                "schedule": learner["schedule"], **payload}
        if "resume" in payload:
            ckpt["resume"] = {**payload["resume"], "rule": learner["rule"],
                              "stage_rng": learner["stage_rng"]}
        save_atomic(ckpt, path)
        for p in paths:  # reassembled: the ordinary file is the checkpoint from now on
            p.unlink()

    def load(self, ckpt: dict[str, Any]) -> None:
        self.worker.load(ckpt)

    def stage_peaks_mb(self, own_mb: float) -> list[float]:
        """Each stage's peak memory so far, bottom stage first, given this (the first) stage's."""
        self.commands.send(Op.MEMORY)
        return self.worker.gather_peaks(own_mb)

    def close(self) -> None:
        self.commands.send(Op.STOP)


def stage_sizes(cfg: Config, model: nn.Module, device: torch.device, autocast) -> list[int]:
    """Modules per stage: ``parallel.balance`` as given, or split by measured per-module cost."""
    from sideways_cli.distributed.balance import measure_module_costs, resolve_balance

    costs = None
    if cfg.parallel.balance == "auto":
        frame = (cfg.data.batch_size, 3, cfg.data.size, cfg.data.size)
        costs = measure_module_costs(model.to(device), frame, device=device, autocast=autocast).total_s
    return resolve_balance(cfg.parallel.balance, cfg.parallel.stages, len(model), costs, model.names)
