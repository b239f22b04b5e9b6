"""VGG-style stack: one module per conv layer, 2D per frame unless ``temporal_kernel`` > 1."""

from __future__ import annotations

from sideways_cli.models.blocks import ClassifierHead, ConvUnit
from sideways_cli.models.stack import FrameStack

# (width multiplier, 2x2 pool after the layer)
_LAYERS = [(1, False), (1, True), (2, False), (2, True), (4, False), (4, True)]


VGG_DEPTH = len(_LAYERS)


def vgg(num_classes: int, width: int = 16, temporal_kernel: int = 1, in_channels: int = 3,
        depth: int = VGG_DEPTH, dropout: float = 0.0) -> FrameStack:
    """``depth`` keeps the first conv layers only (each pool halves the frame)."""
    modules, names, cin = [], [], in_channels
    for i, (mult, pool) in enumerate(_LAYERS[:depth], start=1):
        cout = width * mult
        modules.append(ConvUnit(cin, cout, k=temporal_kernel, pool=pool))
        names.append(f"conv{i}")
        cin = cout
    modules.append(ClassifierHead(cin, num_classes, dropout))
    names.append("head")
    return FrameStack(modules, names)
