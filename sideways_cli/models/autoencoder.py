"""Encoder-decoder for the paper's second task, frame reconstruction: every module a frame-step
module, so both rules pipeline it as they do the classifiers.

The encoder is C3D-like causal 3D convolutions, each halving the frame; the decoder mirrors it with
per-frame upsampling units and ends in a plain convolution back to the image channels (no norm, no
activation: it regresses normalised pixels). The output has the input's shape, [B, C, T, H, W].
"""

from __future__ import annotations

import torch
from torch import nn

from sideways_cli.models.blocks import CausalConv, ConvUnit, FrameModule, PerFrame, group_norm
from sideways_cli.models.stack import FrameStack

AUTOENCODER_LEVELS = 4  # each halves the frame, so 32x32 inputs allow up to 4


class UpUnit(FrameModule):
    """2x nearest upsampling -> per-frame 3x3 conv -> GroupNorm -> ReLU: one decoder level."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = PerFrame(nn.Upsample(scale_factor=2, mode="nearest"))
        self.conv = CausalConv(cin, cout, 1)
        self.post = PerFrame(group_norm(cout), nn.ReLU(inplace=True))

    def valid(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.conv(self.up(x)))


class FrameOutput(FrameModule):
    """2x nearest upsampling -> per-frame 3x3 conv with bias to the image channels."""

    def __init__(self, cin: int, channels: int):
        super().__init__()
        self.up = PerFrame(nn.Upsample(scale_factor=2, mode="nearest"))
        self.out = PerFrame(nn.Conv2d(cin, channels, 3, padding=1))

    def valid(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.up(x))


def autoencoder(channels: int = 3, width: int = 8, temporal_kernel: int = 3, in_channels: int = 3,
                levels: int = 3, dropout: float = 0.0) -> FrameStack:
    """``levels`` encoder levels, then ``levels - 1`` upsampling units and the output module:
    2 x levels modules in all (``model.depth`` sets ``levels``). ``channels`` is the output's (the frames'); ``dropout`` is unused."""
    modules: list[FrameModule] = []
    names, widths, cin = [], [], in_channels
    for level in range(levels):
        cout = width * 2 ** level
        modules.append(ConvUnit(cin, cout, k=temporal_kernel, pool=True))
        names.append(f"enc{level + 1}")
        widths.append(cout)
        cin = cout
    for level in reversed(range(levels - 1)):
        modules.append(UpUnit(cin, widths[level]))
        names.append(f"dec{level + 2}")
        cin = widths[level]
    modules.append(FrameOutput(cin, channels))
    names.append("out")
    return FrameStack(modules, names)
