"""A network as a stack of frame-step modules, the unit that both training rules operate on."""

from __future__ import annotations

from typing import Callable, Iterator, Protocol, Sequence

import torch
from torch import nn

from sideways_cli.models.blocks import ClassifierHead, FrameModule


class FrameStack(nn.Module):
    """Modules f_1 ... f_D kept in an nn.ModuleList so the stack splits into stages for free.

    ``forward`` runs the causal network over a whole clip [B, C, T, H, W] -> [B, K, T]; ``stream``
    runs the same function a time chunk at a time, in memory bounded by the chunk; the pipelined
    (tick-by-tick) path lives in the engine and reuses each module's ``forward_window``.
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

    @property
    def dtype(self) -> torch.dtype:
        """The weights' floating-point type, which inputs are cast to."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @property
    def device(self) -> torch.device:
        """Where the weights are, which inputs are moved to."""
        return next(self.parameters()).device

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        x = clip
        for module in self.stack:
            x = module(x)
        return x

    def stream(self) -> CausalStream:
        """A causal pass that takes a clip's frames in consecutive time chunks (see CausalStream)."""
        return CausalStream(list(self.stack))


def classifier_stack(body: list[FrameModule], names: list[str], features: int, num_classes: int,
                     dropout: float) -> FrameStack:
    """A classifier of the zoo: ``body`` (its modules named ``names``, the last with ``features``
    output channels) topped by the per-frame :class:`ClassifierHead`, named "head"."""
    return FrameStack([*body, ClassifierHead(features, num_classes, dropout)], [*names, "head"])


class CausalStream:
    """The causal network fed one time chunk [B, C, n, ...] after another: each call returns the
    chunk's n outputs, exactly what the whole-clip forward gives for those frames.

    Each module with a window of k keeps the last k-1 inputs it was given (zeros before the first
    chunk: the causal padding), so a chunk's windows reach back into the previous chunk. Memory is
    one chunk's activations plus k-1 frames per module, whatever the clip length.
    """

    def __init__(self, modules: Sequence[FrameModule]):
        self.modules = modules
        self.history: list[torch.Tensor | None] = [None] * len(modules)

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        x = chunk
        for d, module in enumerate(self.modules):
            k = module.window
            if k > 1:
                past = self.history[d]
                if past is None:
                    past = x.new_zeros((*x.shape[:2], k - 1, *x.shape[3:]))
                x = torch.cat([past, x], dim=2)
                self.history[d] = x[:, :, -(k - 1):].clone()  # a view would keep all of x
            x = module.valid(x)
        return x


class CausalNetwork(Protocol):
    """What evaluation runs: a FrameStack, or a network split across stage processes
    (``distributed.staged_eval.StagedNetwork``)."""

    dtype: torch.dtype

    def stream(self) -> Callable[[torch.Tensor], torch.Tensor]: ...

    def eval(self): ...

    def train(self, mode: bool = True): ...


def causal_outputs(model: CausalNetwork, clips: torch.Tensor, frames: int) -> Iterator[torch.Tensor]:
    """The network's outputs over ``clips`` [B, C, T, ...], ``frames`` frames at a time (time at
    dim 2): together, exactly the whole-clip forward, in memory bounded by ``frames``."""
    if frames < 1:
        raise ValueError(f"an evaluation chunk holds at least one frame, got {frames}")
    stream = model.stream()
    for chunk in clips.split(frames, dim=2):
        yield stream(chunk)
