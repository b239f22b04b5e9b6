"""A network as a stack of frame-step modules, the unit that both training rules operate on."""

from __future__ import annotations

import torch
from torch import nn

from sideways_cli.models.blocks import FrameModule


class FrameStack(nn.Module):
    """Modules f_1 ... f_D kept in an nn.ModuleList so the stack splits into stages for free.

    ``forward`` runs the causal network over a whole clip [B, C, T, H, W] -> [B, K, T]; the
    pipelined (tick-by-tick) path lives in the engine and reuses each module's ``forward_window``.
    """

    def __init__(self, modules: list[FrameModule], names: list[str]):
        super().__init__()
        if len(modules) != len(names):
            raise ValueError("one name per module")
        self.stack = nn.ModuleList(modules)
        self.names = list(names)

    def __len__(self) -> int:
        return len(self.stack)

    def __getitem__(self, d: int) -> FrameModule:
        return self.stack[d]

    @property
    def windows(self) -> list[int]:
        return [m.window for m in self.stack]

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        x = clip
        for module in self.stack:
            x = module(x)
        return x
