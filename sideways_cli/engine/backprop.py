"""Exact backprop: autograd through the causal network run over the whole clip at once.

Memory grows with T x D: every activation of the clip is kept until the backward pass.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from sideways_cli.engine.losses import CLASSIFY, Objective, at_least_fp32
from sideways_cli.engine.rule import ApplyUpdate, BatchStats, LossSum
from sideways_cli.models import FrameStack
from sideways_cli.support.runtime import Autocast


class BackpropRule:
    def __init__(self, model: FrameStack, objective: Objective = CLASSIFY,
                 autocast: Autocast = nullcontext):
        self.model = model
        self.objective = objective
        self.autocast = autocast

    def train_batch(self, clips: torch.Tensor, labels: torch.Tensor,
                    apply_update: ApplyUpdate) -> BatchStats:
        with self.autocast():
            outputs = self.model(clips)
        loss = self.objective.clip_loss(at_least_fp32(outputs), clips, labels)
        loss.backward()
        apply_update()
        frames = clips.shape[2]
        return BatchStats(LossSum.of_mean(loss, frames), clips.shape[0] * frames, updates=1)

    def state_dict(self) -> dict[str, Any]:
        return {}  # every batch starts from nothing but the weights

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
