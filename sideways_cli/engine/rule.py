"""What a training rule gives the trainer: gradients in ``param.grad`` and a call to step."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Protocol

import torch

ApplyUpdate = Callable[[], None]


class LossSum:
    """The per-frame losses of a batch, summed where they were computed.

    Reading a GPU value makes the host wait until every kernel queued before it has run, and the
    GPU then idles while the host queues the next ones: the rules add their losses here, as
    device tensors, and :meth:`mean` reads the sum once per batch.
    """

    def __init__(self, total: torch.Tensor | None = None, count: int = 0) -> None:
        """Empty, or holding ``total``, a sum of ``count`` per-frame losses formed elsewhere."""
        self.total: torch.Tensor | None = None
        self.count = 0
        if total is not None:
            self.add(total, count)

    @classmethod
    def of_mean(cls, mean: torch.Tensor, count: int) -> LossSum:
        """``count`` per-frame losses known only by their mean (a clip's loss, as backprop
        computes it), as the sum of theirs that the per-frame rules add up."""
        return cls(mean.detach().double() * count, count)

    def add(self, total: torch.Tensor, count: int = 1) -> None:
        """The sum ``total`` (a 0-dim tensor) of ``count`` per-frame losses."""
        # in float64, as the Python floats it replaces were summed: the logged loss does not move
        total = total.detach().double()
        self.total = total if self.total is None else self.total + total
        self.count += count

    def mean(self) -> float:
        """The mean of the losses added (0 if none): the batch's one host synchronisation."""
        return 0.0 if self.total is None else self.total.item() / max(self.count, 1)


@dataclass
class BatchStats:
    """What a batch did. Its losses stay summed on the device (``summed``) until :attr:`loss` is
    first read, so that a parallel job can add every process's before anything waits for them."""

    summed: LossSum  # the per-frame losses computed during the batch
    frames: int  # frames that entered the network (clips x frames)
    updates: int  # how many times the rule called apply_update
    replicas: int = 1  # data-parallel replicas whose losses ``summed`` adds up, each over its shard

    @property
    def losses(self) -> int:
        """How many per-frame losses the mean is over (per clip of the batch): every replica
        computed as many, each over its own shard of the clips."""
        return self.summed.count // self.replicas

    @cached_property
    def loss(self) -> float:
        """The mean of the per-frame losses (read from the device once)."""
        return self.summed.mean()


class GradientRule(Protocol):
    """Turns one batch of clips into parameter gradients and calls ``apply_update`` to step.

    The rule adds its gradients to ``param.grad`` (as a backward pass does) and calls
    ``apply_update`` when its schedule says the weights change (once per batch for BP and
    ``update: clip``; every N ticks otherwise). The trainer's ``apply_update`` steps the optimizer
    and clears the gradients, or leaves them for the next batch to add to (``train.accumulate``);
    it knows nothing of the rule.
    """

    def train_batch(self, clips: torch.Tensor, labels: torch.Tensor,
                    apply_update: ApplyUpdate) -> BatchStats: ...

    def state_dict(self) -> dict[str, Any]:
        """What the rule carries from one batch to the next (detached tensors), for a checkpoint."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
