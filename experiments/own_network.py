"""A network of your own, trained by both rules (docs/networks.md, "Bring your own network"):

    sideways compare experiments/synthetic.yaml --set model.name=experiments/own_network.py

A network is a FrameStack: a list of FrameModules, each mapping a causal window of its last
`window` inputs to one output frame. A module implements `valid`: over a time axis of L inputs it
gives the L - window + 1 outputs of every full window, with no temporal padding; the engine pads
for the whole-clip path and feeds register windows on the tick path, so both compute the same
function. Normalise per sample (GroupNorm, not BatchNorm): a frame's output must not depend on
the other clips of its batch.
"""

import torch
import torch.nn.functional as F
from torch import nn

from sideways_cli.models import (ClassifierHead, ConvUnit, FrameModule, FrameStack, batch_to_frames,
                                 frames_to_batch, group_norm)


class FrameDifference(FrameModule):
    """A 2D convolution of each frame stacked with its change since the frame before: window 2."""

    window = 2

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(2 * cin, cout, kernel_size=3, padding=1)
        self.norm = group_norm(cout)

    def valid(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, L, H, W] -> [B, cout, L - 1, H, W]."""
        newest, before = x[:, :, 1:], x[:, :, :-1]
        pairs = torch.cat([newest, newest - before], dim=1)
        y = F.relu(self.norm(self.conv(frames_to_batch(pairs))))
        return batch_to_frames(y, pairs.shape[2])


def build(num_classes: int, width: int = 8, k: int = 3) -> FrameStack:
    """Called as build(num_classes, **model.args), e.g. --set model.args.width=16."""
    modules = [
        FrameDifference(3, width),
        ConvUnit(width, 2 * width, k, pool=True),  # causal 3D conv, GroupNorm, ReLU, 2x2 max-pool
        ConvUnit(2 * width, 4 * width, k, pool=True),
        ClassifierHead(4 * width, num_classes),  # global average pool, linear: [B, K] per frame
    ]
    return FrameStack(modules, ["difference", "conv2", "conv3", "head"])
