"""What every process of a job trains: its slice of the network (all of it with one stage), with
its optimizer, LR schedule and executor, and the averaging of its gradients over its replica
group. The training loop (``train.py``) is the same on every process and sees only this class.

Where a process stands in the job decides only what it feeds and what it is fed: the first stage
is given the batch's clips, the last gets the targets its loss needs from the first (labels; for
reconstruction the clips), and every other stage knows the batch's shape from the config alone.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sideways_cli.config import Config
from sideways_cli.engine.clock import Schedule, runs_chunked
from sideways_cli.engine.fidelity import gradient_fidelity
from sideways_cli.engine.losses import OBJECTIVES
from sideways_cli.engine.rule import BatchStats
from sideways_cli.models import FrameStack
from sideways_cli.models.stack import CausalNetwork
from sideways_cli.parallel.balance import measure_module_costs, resolve_balance
from sideways_cli.parallel.contribution import Contribution
from sideways_cli.parallel.links import StageFailure, is_link_failure
from sideways_cli.parallel.resharding import (model_state_for_stage, model_state_to_network, moved,
                                              optimizer_for_stage, stage_rule_share)
from sideways_cli.parallel.staged_chunked import StagedChunked
from sideways_cli.parallel.staged_eval import StagedNetwork, serve_evaluation
from sideways_cli.parallel.staged_sideways import StagedSideways
from sideways_cli.parallel.stages import output_specs, stage_ranges, stage_stack
from sideways_cli.parallel.topology import Topology
from sideways_cli.run.build import (IMAGE_CHANNELS, DTYPES, make_lr_schedule, make_optimizer,
                                    objective_of, parameter_groups, rule_for)
from sideways_cli.run.ema import WeightEma
from sideways_cli.run.evaluations import ema_metric
from sideways_cli.run.gradient_norm import clip_to, squared_norm
from sideways_cli.run.resume import carried_rule_state, restore_rng, rng_state
from sideways_cli.support.runtime import forward_autocast


class StageLearner:
    """Stage ``topology.stage`` of replica ``topology.replica``: its modules of ``network``, the
    whole network built from the seed (``build.build_network``: the same on every process), split
    as every process agrees (:func:`agreed_stage_sizes`)."""

    def __init__(self, cfg: Config, topology: Topology, network: FrameStack):
        self.cfg, self.topology = cfg, topology
        device = topology.device
        self.autocast = forward_autocast(device, cfg.amp)
        model = network.to(device)
        self.schedule = Schedule.of(model, cfg.sideways.stash)  # the whole network's
        sizes = agreed_stage_sizes(cfg, topology, model) if topology.stages > 1 else [len(model)]
        ranges = stage_ranges(sizes)
        self.modules = ranges[topology.stage]
        # each stage's parameters in each optimizer group: how the network's optimizer splits
        self.counts = [[len(group) for group in parameter_groups(cfg.train, stage_stack(model, r))]
                       for r in ranges]
        # what crosses each boundary, computed here, on this device, under this autocast: the
        # dtype a stage sends is the one its neighbour receives into
        specs = (output_specs(model, (IMAGE_CHANNELS, cfg.data.size, cfg.data.size), self.autocast,
                              device) if topology.stages > 1 else [])
        self.stack: FrameStack = model if topology.stages == 1 else stage_stack(model, self.modules)
        self.optimizer = make_optimizer(cfg.train, self.stack)
        self.lr_schedule = make_lr_schedule(cfg.train, self.optimizer)
        self.trained_lr = self.lr  # the last batch's (train_batch sets it)
        self.objective = objective_of(cfg)
        self.ddp: DistributedDataParallel | None = None  # BP's replicas, one stage each
        self.specs = specs
        self.executor = self._executor(specs)
        self.ema = WeightEma(self.stack, cfg.train.ema_decay) if cfg.train.ema_decay else None
        # the batch's place in its step (train.accumulate batches each), and the step's last update's
        # global gradient norm before clipping (with train.clip_grad_norm)
        self.batch_in_step = 0
        self.grad_norm: torch.Tensor | None = None

    def _executor(self, specs: list) -> Any:
        cfg, topology = self.cfg, self.topology
        if topology.stages == 1:
            trained: nn.Module = self.stack
            if cfg.mode == "bp" and topology.across is not None:  # averaged in the backward pass
                trained = self.ddp = DistributedDataParallel(self.stack,
                                                             process_group=topology.across.group)
            return rule_for(cfg, trained, self.autocast)
        stage = (self.stack, self.modules, self.schedule, topology, specs,
                 cfg.sideways.between_clips)
        if cfg.mode == "sideways" and runs_chunked(cfg.sideways.update, cfg.sideways.chunk):
            return StagedChunked(*stage, cfg.sideways.chunk, self.objective, self.autocast)
        if cfg.mode == "sideways":
            return StagedSideways(*stage, cfg.sideways.update, self.objective, self.autocast)
        # imported here: torch.distributed.pipelining takes seconds to import (torch._dynamo,
        # DTensor), which every process of every command would pay otherwise
        from sideways_cli.parallel.pipelined_bp import PipelinedBackprop

        return PipelinedBackprop(self.stack, topology.stage, topology.stages, cfg.parallel.bp_schedule,
                                 cfg.parallel.microbatches, self.objective, topology.device,
                                 self.autocast, group=topology.pipelined_bp)

    @property
    def lr(self) -> float:
        """The learning rate the next batch trains with."""
        return self.optimizer.param_groups[0]["lr"]

    @property
    def batch_shape(self) -> torch.Size:
        """Every training batch's shape on each replica [B, C, T, H, W], from the config (the
        loader drops the last, short batch of an epoch)."""
        d = self.cfg.data
        return torch.Size([d.batch_size // self.topology.replicas, IMAGE_CHANNELS, d.clip_len,
                           d.size, d.size])

    def apply_update(self) -> None:
        """The one place where both rules step: the rule has added its gradients to ``.grad``.
        Before the step's last batch (``train.accumulate``) they stay there for the next to add
        to; then they are averaged over the step's batches and, with replicas, over them (every
        replica's stage steps at the same point of the schedule; DDP has averaged BP's already),
        clipped to ``train.clip_grad_norm``, stepped, and the EMA of the weights follows."""
        accumulate = self.cfg.train.accumulate
        if self.batch_in_step < accumulate - 1:
            return
        params = [p for p in self.stack.parameters() if p.grad is not None]
        if accumulate > 1 and params:
            torch._foreach_mul_([p.grad for p in params], 1 / accumulate)
        if self.topology.across is not None and self.ddp is None:
            self.topology.across.average_gradients(params)
        if self.cfg.train.clip_grad_norm:
            self.grad_norm = self._global_norm([p.grad for p in params])
            clip_to([p.grad for p in params], self.grad_norm, self.cfg.train.clip_grad_norm)
        if self.ema is not None:  # the modules this step changes: those with a gradient (a
            # Sideways module's first message may still be on its way down)
            stepped = tuple(f"stack.{d}." for d, module in enumerate(self.stack.stack)
                            if any(p.grad is not None for p in module.parameters()))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.stack, stepped)

    def _global_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The norm of the whole network's gradient: with stages, every process adds the squares
        of its own, after its batch's traffic with its neighbours is done (config.py allows
        clipping across stages only with updates at the end of a batch), each replica's alike
        (their gradients are averaged already)."""
        squares = squared_norm(grads, self.topology.device)
        if self.topology.stages > 1:
            self.topology.reduce_(squares, torch.distributed.ReduceOp.SUM, "summing the gradient norm")
            squares /= self.topology.replicas
        return squares.sqrt()

    def train_batch(self, clips: torch.Tensor | None, labels: torch.Tensor | None,
                    stop: int = 0, batch_in_step: int = 0) -> tuple[BatchStats, int]:
        """One batch, the ``batch_in_step``-th of its step: the first stage passes its shard of
        the clips and labels, the others None. The rule's gradients, the optimizer's step(s) and,
        after a step's last batch, the schedule's step; the whole job's stats and the stop signal
        every process then agrees on, given the one this process received (``stop``; 0: none)."""
        shape = self.batch_shape
        if clips is not None and clips.shape != shape:
            raise ValueError(f"a training batch of shape {tuple(clips.shape)}, not {tuple(shape)}")
        self.batch_in_step = batch_in_step
        if batch_in_step == 0:
            self.grad_norm = None  # until this step's update, if it makes one
        last = batch_in_step == self.cfg.train.accumulate - 1
        # DDP averages in every backward pass, unless told the gradients stay local for now
        with self.ddp.no_sync() if self.ddp is not None and not last else nullcontext():
            if not self.topology.distributed:  # the rule's own statistics are the job's
                stats = self.executor.train_batch(clips, labels, self.apply_update)
            else:
                if self.topology.stages > 1:
                    clips, labels = self._targets(clips, labels, shape)
                contribution = replace(self._contribution(clips, labels, shape), stop=stop)
                stats, stop = self.topology.batch_stats(contribution)
        if not last:
            return stats, stop
        self.trained_lr = self.lr  # what this batch's updates used, as its log line says
        with warnings.catch_warnings():
            # the schedule counts batches; a batch may make no update (in continuous mode with
            # updates every N ticks, the first messages are still on their way down), which torch
            # warns of as a misordered step
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.lr_schedule.step()
        return stats, stop

    def _targets(self, clips: torch.Tensor | None, labels: torch.Tensor | None,
                 shape: torch.Size) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The last stage's targets, from the first stage: what its loss compares with."""
        links, top = self.topology.links, self.topology.stages - 1
        needs_clips = self.cfg.task == "reconstruct"
        if self.topology.is_first:
            links.send(labels, top)
            if needs_clips:
                links.send(clips, top)
            return clips, labels
        if not self.topology.is_last:
            return None, None
        labels = links.receive(*self._label_spec(shape), 0, "the batch's labels").wait()
        if needs_clips:
            clips = links.receive(shape, DTYPES[self.cfg.precision], 0, "the batch's clips").wait()
        return clips, labels

    def _label_spec(self, shape: torch.Size) -> tuple[tuple[int, ...], torch.dtype]:
        """The shape and dtype of a batch's labels: class indices, or with MixUp or CutMix class
        probabilities (as many as the head's outputs) in the run's precision."""
        augment = self.cfg.data.augment
        if not (augment.mixup or augment.cutmix):
            return (shape[0],), torch.int64
        (classes,), _ = self.specs[-1]
        return (shape[0], classes), DTYPES[self.cfg.precision]

    def _contribution(self, clips: torch.Tensor | None, labels: torch.Tensor | None,
                      shape: torch.Size) -> Contribution:
        """This process's share of the batch's statistics, its gradients applied."""
        topology = self.topology
        if topology.stages > 1 and self.cfg.mode == "sideways":
            return self.executor.train_batch(clips, labels, self.apply_update, shape)
        try:
            stats = self.executor.train_batch(clips, labels, self.apply_update)
        except StageFailure:  # named already
            raise
        except RuntimeError as exc:  # DDP's all_reduce in the backward pass: a replica is gone
            if topology.across is None or not is_link_failure(exc):
                raise
            raise topology.across.failure("averaging the gradients", exc) from None
        if topology.stages > 1:  # pipelined BP: every stage counts the frames, the last the losses
            topology.links.settle()  # the targets sent to the last stage
        return Contribution.of(stats, losses=topology.is_last, frames=topology.is_first)

    def fidelity(self, clips: torch.Tensor, labels: torch.Tensor) -> list[dict]:
        """Each module's gradient fidelity on this batch from the weights its step starts from
        (``engine/fidelity.py``), with neither rule stepping; the whole network (one stage). The
        training goes on as without it: between steps no ``.grad`` is set (the rule keeps what it
        carries across batches in its own registers), and the measurement leaves none."""
        return gradient_fidelity(self.stack, clips, labels, self.objective, self.cfg.sideways.stash)

    def evaluated(self, evaluate: Callable[[CausalNetwork], dict[str, float]]) -> dict[str, float]:
        """The metrics ``evaluate(network)`` computes, and with ``train.ema_decay`` those of the
        average of the weights beside them (``val_ema_*``)."""
        metrics = self._evaluated(evaluate)
        if self.ema is not None:
            with self.ema.swapped_in(self.stack):  # on every process: each its own stage's
                averaged = self._evaluated(evaluate)
            metrics |= {ema_metric(key): value for key, value in averaged.items()}
        return metrics

    def _evaluated(self, evaluate: Callable[[CausalNetwork], dict[str, float]]) -> dict[str, float]:
        """The metrics ``evaluate(network)`` computes on the first stage, with the network as the
        first stage sees it, on every process of the job: the other stages serve the first's
        time chunks meanwhile, then receive its metrics."""
        topology = self.topology
        if topology.stages == 1:
            return evaluate(self.stack)
        links = topology.links
        if topology.is_first:
            network = StagedNetwork(self.stack, links, self.autocast)
            metrics = evaluate(network)
            network.close()
        else:
            serve_evaluation(self.stack, links, self.autocast)
            metrics = None
        return topology.broadcast_object(metrics, links.ranks[0], links.pipeline,
                                         "receiving the evaluation's metrics")

    def shard(self, resuming: bool) -> dict[str, Any]:
        """This process's part of a checkpoint under the network's keys: its modules' weights, its
        optimizer, the schedule and, for a checkpoint that resumes, its rule's registers and its
        random streams."""
        shard = {"model": model_state_to_network(self.stack.state_dict(), self.modules),
                 "optimizer": self.optimizer.state_dict(), "schedule": self.lr_schedule.state_dict()}
        if self.ema is not None:
            shard["ema"] = model_state_to_network(self.ema.state_dict(), self.modules)
        if resuming:
            shard["rule"] = self.executor.state_dict()
            shard["rng"] = rng_state(self.topology.device)
        return shard

    def load(self, ckpt: dict[str, Any]) -> None:
        """This process's share of a checkpoint in one process's layout (``RunDir.load_checkpoint``
        merges a job's shards into it), whatever the replicas and stages that wrote it."""
        cfg, topology = self.cfg, self.topology
        staged = topology.stages > 1
        self.stack.load_state_dict(model_state_for_stage(ckpt["model"], self.modules) if staged
                                   else ckpt["model"])
        self.optimizer.load_state_dict(optimizer_for_stage(ckpt["optimizer"], self.counts,
                                                           topology.stage) if staged
                                       else ckpt["optimizer"])
        self.lr_schedule.load_state_dict(ckpt["schedule"])
        if self.ema is not None:
            self.ema.load_state_dict(model_state_for_stage(ckpt["ema"], self.modules) if staged
                                     else ckpt["ema"])
        rule = carried_rule_state(ckpt["resume"]["rule"], cfg)
        if rule is not None:
            rule = stage_rule_share(rule, cfg.mode, cfg.sideways.update, cfg.sideways.chunk,
                                    self.modules, topology.stage, topology.stages)
            if topology.across is not None:  # the whole batch's registers: this replica's slice
                rule = topology.across.own_share(rule)
            self.executor.load_state_dict(moved(rule, topology.device))
        self._restore_rng(ckpt)

    def _restore_rng(self, ckpt: dict[str, Any]) -> None:
        """This process's own random streams where the checkpoint's job had the same shape;
        otherwise the first stage's (every replica's) continue the run's, and the other stages'
        their own stage's where an older checkpoint kept them."""
        topology, resume = self.topology, ckpt["resume"]
        saved = ckpt.get("topology", {"replicas": 1, "stages": 1})
        same = (saved["replicas"], saved["stages"]) == (topology.replicas, topology.stages)
        if same and "rank_rng" in resume:
            restore_rng(resume["rank_rng"][topology.rank], topology.device)
        elif topology.is_first:
            restore_rng(resume["rng"], topology.device)
        elif resume.get("stage_rng") is not None and topology.stage < len(resume["stage_rng"]):
            torch.set_rng_state(resume["stage_rng"][topology.stage].cpu())


def agreed_stage_sizes(cfg: Config, topology: Topology, model: FrameStack) -> list[int]:
    """Modules per stage: ``parallel.balance`` as given, or split by per-module cost as measured
    by global rank 0 (every process must split alike; measuring on every one at once would also
    make them compete for the cores)."""
    if cfg.parallel.balance != "auto":
        return resolve_balance(cfg.parallel.balance, cfg.parallel.stages, len(model), None,
                               model.names)
    sizes = None
    if topology.is_writer:
        frame = (cfg.data.batch_size, IMAGE_CHANNELS, cfg.data.size, cfg.data.size)
        costs = measure_module_costs(model, frame, device=topology.device,
                                     autocast=forward_autocast(topology.device, cfg.amp),
                                     objective=OBJECTIVES[cfg.task]).total_s
        sizes = resolve_balance("auto", cfg.parallel.stages, len(model), costs, model.names)
    return topology.from_writer(sizes, "agreeing on the stages' sizes")
