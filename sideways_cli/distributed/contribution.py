"""What one process adds to a batch's statistics, before they are summed over the job."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Contribution:
    """This process's share of a batch: the sum of the frame losses it computed (on the device:
    read once per batch, when the job sums them), how many, the frames it fed to the network,
    and one flag per point of the batch where the optimizer may step (True where it did).

    Losses come from the last stage only, frames from the first only; every process of a job
    has the same number of update points, so the flags line up when summed."""

    loss_sum: torch.Tensor | float = 0.0
    losses: int = 0
    frames: int = 0
    flushes: list[bool] = field(default_factory=list)
