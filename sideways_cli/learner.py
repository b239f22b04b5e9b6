"""What the training loop trains: a :class:`Learner`, the network with its rule, optimizer and
schedule, in this process (:class:`LocalLearner`), as one of several data-parallel replicas
(``distributed.replicated.ReplicatedLearner``) or split across stage processes
(``distributed.learner.DistributedLearner``). The loop sees only this interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from sideways_cli.build import build_network, make_optimizer, make_schedule, rule_for
from sideways_cli.config import Config
from sideways_cli.engine.rule import BatchStats
from sideways_cli.models.stack import CausalNetwork
from sideways_cli.resume import carried_rule_state
from sideways_cli.rundir import save_checkpoint
from sideways_cli.runtime import Autocast


class Learner(Protocol):
    model: CausalNetwork  # what evaluation runs

    @property
    def lr(self) -> float: ...

    def train_batch(self, clips: torch.Tensor, labels: torch.Tensor) -> BatchStats:
        """One batch (with replicas: this replica's shard): the rule's gradients, the
        optimizer's step(s), the schedule's step; the whole batch's stats."""
        ...

    def save(self, path: Path, payload: dict[str, Any]) -> None:
        """The checkpoint: weights, optimizer, schedule and ``payload``; a ``resume`` entry in it
        gets the rule's registers too. Every replica calls it; one writes."""
        ...

    def load(self, ckpt: dict[str, Any]) -> None: ...

    def peaks_mb(self, own_mb: float) -> list[float]:
        """Peak memory so far per stage (this process's is ``own_mb``), bottom stage first; with
        replicas, each stage's largest over them."""
        ...

    def close(self) -> None: ...


class LocalLearner:
    """The network, its rule, optimizer and schedule in this process."""

    def __init__(self, cfg: Config, num_classes: int, device: torch.device, autocast: Autocast):
        self.cfg = cfg
        self.model = build_network(cfg, num_classes).to(device)
        self.rule = rule_for(cfg, self.trained(), autocast)
        self.optimizer = make_optimizer(cfg.train, self.model)
        self.schedule = make_schedule(cfg.train, self.optimizer)

    def trained(self) -> nn.Module:
        """The module the rule runs: the network (a replica wraps it)."""
        return self.model

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def apply_update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_batch(self, clips: torch.Tensor, labels: torch.Tensor) -> BatchStats:
        stats = self.rule.train_batch(clips, labels, self.apply_update)
        self.schedule.step()
        return stats

    def rule_state(self, resuming: bool) -> dict[str, Any] | None:
        """The rule's registers for a checkpoint that resumes (None: this process writes none)."""
        return self.rule.state_dict() if resuming else {}

    def save(self, path: Path, payload: dict[str, Any]) -> None:
        rule = self.rule_state("resume" in payload)
        if rule is None:
            return
        ckpt = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), **payload}
        if "resume" in payload:
            ckpt["resume"] = {**payload["resume"], "rule": rule}
        save_checkpoint(ckpt, path)

    def load(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        state = carried_rule_state(ckpt["resume"]["rule"], self.cfg)
        if state is not None:
            self.rule.load_state_dict(self.own_share(state))

    def own_share(self, state: dict[str, Any]) -> dict[str, Any]:
        """This process's part of a checkpoint's registers: all of them."""
        return state

    def peaks_mb(self, own_mb: float) -> list[float]:
        return [own_mb]

    def close(self) -> None:
        pass
