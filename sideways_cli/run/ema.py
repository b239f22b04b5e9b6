"""``train.ema_decay``: an exponential moving average of a network's weights, kept beside them.

After every optimizer step each floating-point tensor of the state dict (weights and BatchNorm
statistics alike) moves ``1 - decay`` of the way to the network's; integer buffers (BatchNorm's
step count) are copied. It starts as the network's weights. Each process keeps its own stage's,
under the network's keys in a checkpoint, like the weights themselves.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class WeightEma:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.weights = {key: value.detach().clone() for key, value in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One more step of the average, towards ``module``'s weights now."""
        current = module.state_dict()
        floats = [key for key, value in self.weights.items() if value.is_floating_point()]
        torch._foreach_lerp_([self.weights[key] for key in floats],
                             [current[key].detach() for key in floats], 1 - self.decay)
        for key, value in self.weights.items():
            if not value.is_floating_point():
                value.copy_(current[key])

    @contextmanager
    def swapped_in(self, module: nn.Module) -> Iterator[None]:
        """``module`` holds the average inside the block, its own weights again after it."""
        raw = {key: value.detach().clone() for key, value in module.state_dict().items()}
        module.load_state_dict(self.weights)
        try:
            yield
        finally:
            module.load_state_dict(raw)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.weights)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in self.weights.items():
            value.copy_(state[key])
