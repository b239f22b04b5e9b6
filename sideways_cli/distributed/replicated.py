"""One of R data-parallel replicas of the whole network in this process (``parallel.replicas`` >
1, ``parallel.stages`` 1): a :class:`~sideways_cli.learner.LocalLearner` over this replica's
shard of every batch, whose gradients are averaged with the other replicas' before every step.
BP's through DistributedDataParallel (during the backward pass); Sideways' pseudo-gradients, which
the rule writes into ``.grad`` only when it steps, by a bucketed all_reduce just before the step,
so every replica applies the same update at the same tick, in both update modes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sideways_cli.config import Config
from sideways_cli.distributed.links import StageFailure, is_link_failure
from sideways_cli.distributed.replicas import ReplicaGroup
from sideways_cli.engine.rule import BatchStats
from sideways_cli.learner import LocalLearner
from sideways_cli.runtime import Autocast


class ReplicatedLearner(LocalLearner):
    def __init__(self, cfg: Config, num_classes: int, device: torch.device, autocast: Autocast,
                 across: ReplicaGroup):
        self.across = across
        super().__init__(cfg, num_classes, device, autocast)

    def trained(self) -> nn.Module:
        if self.cfg.mode == "bp":
            return DistributedDataParallel(self.model, process_group=self.across.group)
        return self.model

    def apply_update(self) -> None:
        if self.cfg.mode == "sideways":
            self.across.average_gradients(self.model.parameters())
        super().apply_update()

    def train_batch(self, clips: torch.Tensor, labels: torch.Tensor) -> BatchStats:
        try:
            stats = super().train_batch(clips, labels)
        except StageFailure:  # named already (the averaging before a Sideways step)
            raise
        except RuntimeError as exc:  # DDP's all_reduce in the backward pass: a replica is gone
            if not is_link_failure(exc):
                raise
            raise self.across.failure("averaging the gradients", exc) from None
        return self.across.batch_stats(stats)

    def rule_state(self, resuming: bool) -> dict[str, Any] | None:
        """The whole batch's registers, gathered from every replica to replica 0, which writes."""
        state = self.across.whole_batch(self.rule.state_dict()) if resuming else {}
        return state if self.across.replica == 0 else None

    def own_share(self, state: dict[str, Any]) -> dict[str, Any]:
        return self.across.own_share(state)

    def peaks_mb(self, own_mb: float) -> list[float]:
        return self.across.largest([own_mb], "gathering the replicas' peak memory")
