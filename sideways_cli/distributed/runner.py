"""One process per stage: the first runs the ordinary training loop (data, logs, evaluation,
checkpoints) through ``learner.DistributedLearner`` and tells the others what to do next; each
stage owns its modules' weights, optimizer and schedule.

The first stage broadcasts one small command per step (train a batch of this shape, evaluate a
time chunk, save a shard, stop); the work itself flows stage to stage (``links.py``). The others
never touch the dataset or the run directory, except to write their checkpoint shards.
"""

from __future__ import annotations

import enum
import random
from typing import Any

import torch
import torch.distributed as dist

from sideways_cli.build import build_network, make_optimizer, make_schedule
from sideways_cli.config import Config
from sideways_cli.distributed.context import STARTUP_TIMEOUT, StageContext
from sideways_cli.distributed.shards import (batched_for_stage, merge_batched, merge_optimizers,
                                             merge_sideways, model_state_for_stage,
                                             model_state_to_network, optimizer_for_stage,
                                             sideways_for_stage)
from sideways_cli.distributed.staged_batched import StagedTickBatched
from sideways_cli.distributed.staged_sideways import StagedSideways
from sideways_cli.distributed.stages import output_specs, stage_ranges, stage_stack
from sideways_cli.engine.losses import OBJECTIVES
from sideways_cli.engine.rule import BatchStats
from sideways_cli.engine.schedule import runs_chunked
from sideways_cli.memory import PeakMemory
from sideways_cli.resume import carried_rule_state
from sideways_cli.rundir import CHECKPOINTS, RunDir, save_checkpoint
from sideways_cli.runtime import forward_autocast

TARGET_TAG, EVAL_TAG = 1, 2  # links' tags besides the ticks' (staged_sideways.TICK_TAG)
_COMMAND_SLOTS = 8


class Command(enum.IntEnum):
    TRAIN = 1  # args: the batch shape B, C, T, H, W
    EVAL = 2  # args: 1 for an evaluation batch's first time chunk, else 0
    SAVE = 3  # args: which checkpoint (index into rundir.CHECKPOINTS)
    STOP = 4
    MEMORY = 5  # every stage reports its peak memory so far


def chunked(cfg: Config) -> bool:
    """Whether Sideways stages run the chunked executor, as one process would."""
    return cfg.mode == "sideways" and runs_chunked(cfg.sideways.update, cfg.sideways.chunk)


class StageWorker:
    """What every stage process holds: its modules, optimizer, schedule and rule."""

    def __init__(self, cfg: Config, ctx: StageContext, num_classes: int, sizes: list[int]):
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
            if chunked(cfg):
                self.rule: Any = StagedTickBatched(*stage, cfg.sideways.chunk, self.objective,
                                                   self.autocast)
            else:
                self.rule = StagedSideways(*stage, cfg.sideways.update, self.objective, self.autocast)
        else:
            # imported here: torch.distributed.pipelining takes seconds to import (torch._dynamo,
            # DTensor), which every process of every command would pay otherwise
            from sideways_cli.distributed.pipelined_bp import PipelinedBackprop

            self.rule = PipelinedBackprop(self.stack, ctx.stage, ctx.stages, cfg.parallel.schedule,
                                          cfg.parallel.microbatches, self.objective, ctx.device,
                                          self.autocast, group=ctx.schedule_group)

    def apply_update(self) -> None:
        """With replicas, this stage's gradients are first averaged over them (every replica's
        stage steps at the same point of the schedule)."""
        if self.ctx.across is not None:
            self.ctx.across.average_gradients(self.stack.parameters())
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
            stats = self._reduce_loss(self.rule.train_batch(clips, labels, self.apply_update))
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
        rule = carried_rule_state(ckpt["resume"]["rule"], self.cfg)
        if rule is not None:
            if self.cfg.mode == "sideways":
                for_stage = batched_for_stage if chunked(self.cfg) else sideways_for_stage
                rule = for_stage(rule, self.modules, self.ctx.stage, self.ctx.stages)
            if self.ctx.across is not None:  # the whole batch's registers: this replica's slice
                rule = self.ctx.across.own_share(rule)
            self.rule.load_state_dict(rule)
        stage_rng = ckpt["resume"].get("stage_rng")
        if stage_rng is not None and not self.ctx.is_first:
            torch.set_rng_state(stage_rng[self.ctx.stage].cpu())


def reassemble(shards: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """The ordinary checkpoint's learner part from the stages' shards, bottom stage first."""
    model: dict[str, Any] = {}
    for shard in shards:
        model.update(shard["model"])
    rules = [shard["rule"] for shard in shards]
    rule: dict[str, Any] = {}
    if cfg.mode == "sideways":
        rule = merge_batched(rules) if chunked(cfg) else merge_sideways(rules)
    return {"model": model, "optimizer": merge_optimizers([s["optimizer"] for s in shards]),
            "schedule": shards[0]["schedule"], "rule": rule,
            "stage_rng": [shard["rng"] for shard in shards]}


class CommandChannel:
    """The first stage's one-way control channel to the others: a fixed-size int64 broadcast."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.first_wait = True

    def send(self, command: Command, *args: int) -> None:
        slots = torch.zeros(_COMMAND_SLOTS, dtype=torch.int64, device=self.ctx.device)
        slots[0] = command
        slots[1:1 + len(args)] = torch.tensor(args, dtype=torch.int64)
        self._broadcast(slots, "sending a command")

    def receive(self) -> tuple[Command, list[int]]:
        slots = torch.zeros(_COMMAND_SLOTS, dtype=torch.int64, device=self.ctx.device)
        self._broadcast(slots, "waiting for stage 0's next command")
        values = slots.tolist()
        return Command(values[0]), values[1:]

    def _broadcast(self, slots: torch.Tensor, doing: str) -> None:
        links = self.ctx.links
        try:
            work = dist.broadcast(slots, src=links.ranks[0], group=links.group, async_op=True)
        except RuntimeError as exc:
            raise links.failure(0, doing, exc) from None
        # the first command may wait for stage 0 to load its first batch
        links.wait(work, 0, doing, STARTUP_TIMEOUT if self.first_wait else None)
        self.first_wait = False


def start(ctx: StageContext, setup: dict[str, Any] | None = None) -> dict[str, Any]:
    """A replica's stage 0 tells its other stages how to build themselves (classes, balance,
    checkpoint to resume)."""
    box = [setup]
    links = ctx.links  # the process group's start-up timeout
    dist.broadcast_object_list(box, src=links.ranks[0], group=links.group)
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
    commands = CommandChannel(ctx)
    run = RunDir(setup["out_dir"])
    with PeakMemory(ctx.device) as memory:  # from the same point as the first stage's (train.py)
        while True:
            command, args = commands.receive()
            if command == Command.STOP:
                return
            if command == Command.TRAIN:
                worker.train_batch(None, None, torch.Size(args[:5]))
            elif command == Command.EVAL:
                worker.evaluate_chunk(None, bool(args[0]))
            elif command == Command.SAVE:
                save_shard(worker, run, CHECKPOINTS[args[0]])
            elif command == Command.MEMORY:
                worker.gather_peaks(memory.read())


def save_shard(worker: StageWorker, run: RunDir, which: str) -> None:
    """This stage's shard of a checkpoint; with replicas, replica 0's stage writes it, holding
    the whole batch's registers gathered from every replica's stage."""
    shard, ctx = worker.shard(), worker.ctx
    if ctx.across is not None:
        shard["rule"] = ctx.across.whole_batch(shard["rule"])
    if ctx.replica == 0:
        save_checkpoint(shard, run.stage_shard(which, ctx.stage))
    done = torch.ones(1, device=ctx.device)  # a barrier with a timeout
    ctx.links.all_reduce(done, f"saving the {which} checkpoint")
