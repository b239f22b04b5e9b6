"""Evaluation through a replica's stages: the causal network over each clip a time chunk at a
time (property 1: what the pipelined forward computes), each stage running its own modules.

The first stage drives: evaluation (``evaluate.py``) runs on it as on one process, with a
:class:`StagedNetwork` whose stream takes each chunk through its modules, sends the result up and
receives the network's outputs from the last stage. Every other stage serves
(:func:`serve_evaluation`) until the first says the evaluation is over. Everything flows up the
stages on the ``up`` group, and the outputs come back to the first on ``down``: one direction per
group, so NCCL's in-order execution cannot deadlock it. Shapes travel with each chunk (the last
batch of a split is smaller, and a batch whose every video failed to decode is skipped).
"""

from __future__ import annotations

from typing import Callable

import torch

from sideways_cli.models import FrameStack
from sideways_cli.parallel.links import Links
from sideways_cli.support.runtime import Autocast

# What the first stage announces before each chunk, or at the end
_FIRST_CHUNK, _NEXT_CHUNK, _END = 1, 2, 0


class StagedNetwork:
    """The network as the first stage sees it during evaluation (a ``stack.CausalNetwork``)."""

    def __init__(self, stack: FrameStack, links: Links, autocast: Autocast):
        self.stack, self.links, self.autocast = stack, links, autocast

    @property
    def dtype(self) -> torch.dtype:
        return self.stack.dtype

    @property
    def training(self) -> bool:
        return self.stack.training

    def eval(self) -> StagedNetwork:
        self.stack.eval()
        return self

    def train(self, mode: bool = True) -> StagedNetwork:
        self.stack.train(mode)
        return self

    def stream(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A batch's stream: every stage starts its modules' windows from zeros."""
        own, first = self.stack.stream(), True

        def forward_chunk(chunk: torch.Tensor) -> torch.Tensor:
            nonlocal first
            with self.autocast():
                y = own(chunk)
            _announce(self.links, _FIRST_CHUNK if first else _NEXT_CHUNK)
            self.links.send_sized(y, 1)
            first = False
            outputs = self.links.receive_sized(self.links.stages - 1, "the network's outputs")
            self.links.settle()
            return outputs

        return forward_chunk

    def close(self) -> None:
        """The evaluation is over: the other stages stop serving."""
        _announce(self.links, _END)
        self.links.settle()


@torch.no_grad()
def serve_evaluation(stack: FrameStack, links: Links, autocast: Autocast) -> None:
    """A stage above the first during an evaluation: each chunk from below through its modules,
    up to the next stage (or, from the last, back to the first), until the first says it is over."""
    was_training = stack.training
    stack.eval()
    below, top = links.rank - 1, links.stages - 1
    stream = None
    while True:
        signal = int(links.receive((1,), torch.int64, below, "the evaluation's next chunk").wait())
        if links.rank < top:
            _announce(links, signal)
        if signal == _END:
            break
        x = links.receive_sized(below, "an evaluation chunk")
        if signal == _FIRST_CHUNK or stream is None:
            stream = stack.stream()
        with autocast():
            y = stream(x)
        links.send_sized(y, links.rank + 1 if links.rank < top else 0)
        links.settle()
    links.settle()
    stack.train(was_training)


def _announce(links: Links, signal: int) -> None:
    links.send(torch.tensor([signal], dtype=torch.int64, device=links.device), links.rank + 1)
