"""``train.ema_decay``: an exponential moving average of a network's weights, kept beside them.

After every optimizer step each floating-point tensor of the stepped modules' state dicts
(weights and BatchNorm statistics alike) moves ``1 - decay`` of the way to the network's; integer
buffers (BatchNorm's step count) are copied. A module that step had no gradient for (a Sideways
module whose first gradient message is still on its way down) keeps its average, so one process
keeps the same averages as a job whose stage of that module made no update. It starts as the
network's weights. Each process keeps its own stage's, under the network's keys in a checkpoint,
like the weights themselves.
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
    def update(self, module: nn.Module, stepped: tuple[str, ...] = ("",)) -> None:
        """One more step of the average, towards ``module``'s weights now, for the state-dict keys
        that begin with one of ``stepped`` (the prefixes of the modules the step changed)."""
        current = module.state_dict()
        keys = [key for key in self.weights if key.startswith(stepped)]
        floats = [key for key in keys if self.weights[key].is_floating_point()]
        if floats:  # (none: no module was stepped)
            torch._foreach_lerp_([self.weights[key] for key in floats],
                                 [current[key].detach() for key in floats], 1 - self.decay)
        for key in keys:
            if not self.weights[key].is_floating_point():
                self.weights[key].copy_(current[key])

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
