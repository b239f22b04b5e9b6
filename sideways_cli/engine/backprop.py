"""Exact backprop: autograd through the causal network run over the whole clip at once.

Memory grows with T x D: every activation of the clip is kept until the backward pass.
"""

from __future__ import annotations

import torch

from sideways_cli.engine.losses import CLASSIFY, Objective
from sideways_cli.engine.rule import ApplyUpdate, BatchStats
from sideways_cli.models import FrameStack


class BackpropRule:
    def __init__(self, model: FrameStack, objective: Objective = CLASSIFY):
        self.model = model
        self.objective = objective

    def train_batch(self, clips: torch.Tensor, labels: torch.Tensor,
                    apply_update: ApplyUpdate) -> BatchStats:
        loss = self.objective.clip_loss(self.model(clips), clips, labels)
        loss.backward()
        apply_update()
        frames = clips.shape[2]
        return BatchStats(loss=loss.item(), losses=frames, frames=clips.shape[0] * frames, updates=1)
