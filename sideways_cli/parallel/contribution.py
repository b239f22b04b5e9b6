"""What one process adds to a batch's statistics, before they are summed over the job."""

from __future__ import annotations

from dataclasses import dataclass, field

from sideways_cli.engine.rule import BatchStats, LossSum


@dataclass
class Contribution:
    """This process's share of a batch: the frame losses it computed (summed on the device: read
    once per batch, when the job sums them), the frames it fed to the network, and one flag per
    point of the batch where the optimizer may step (True where it did).

    Losses come from the last stage only, frames from the first only; every process of a job
    has the same number of update points, so the flags line up when summed. A stop signal any
    process received travels with them, so every process stops after the same batch."""

    losses: LossSum = field(default_factory=LossSum)
    frames: int = 0
    flushes: list[bool] = field(default_factory=list)
    stop: int = 0  # a signal asking this process to stop (stop_signals.py); 0: none

    @classmethod
    def of(cls, stats: BatchStats, losses: bool = True, frames: bool = True) -> Contribution:
        """A rule's own statistics of the batch as this process's share (``losses``, ``frames``:
        whether this process counts them); its losses stay on the device."""
        return cls(stats.summed if losses else LossSum(), stats.frames if frames else 0,
                   [True] * stats.updates)
