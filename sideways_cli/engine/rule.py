"""What a training rule gives the trainer: gradients in ``param.grad`` and a call to step."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

ApplyUpdate = Callable[[], None]
Autocast = Callable[[], AbstractContextManager]  # the context forward passes run in (bf16 AMP)


@dataclass
class BatchStats:
    loss: float  # mean of the per-frame losses computed during the batch
    losses: int  # how many per-frame losses that mean is over (per clip of the batch)
    frames: int  # frames that entered the network (clips x frames)
    updates: int  # how many times the rule called apply_update


class GradientRule(Protocol):
    """Turns one batch of clips into parameter gradients and calls ``apply_update`` to step.

    The rule writes ``param.grad`` and calls ``apply_update`` when its schedule says the weights
    change (once per batch for BP and ``update: clip``; every N ticks otherwise). The trainer's
    ``apply_update`` steps the optimizer and clears the gradients; it knows nothing of the rule.
    """

    def train_batch(self, clips: torch.Tensor, labels: torch.Tensor,
                    apply_update: ApplyUpdate) -> BatchStats: ...

    def state_dict(self) -> dict[str, Any]:
        """What the rule carries from one batch to the next (detached tensors), for a checkpoint."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
