"""VGG-style stack: one module per conv layer, 2D per frame unless ``temporal_kernel`` > 1."""

from __future__ import annotations

from sideways_cli.models.blocks import ConvUnit
from sideways_cli.models.stack import FrameStack, classifier_stack

# (width multiplier, 2x2 pool after the layer)
_LAYERS = [(1, False), (1, True), (2, False), (2, True), (4, False), (4, True)]


VGG_DEPTH = len(_LAYERS)


def vgg(num_classes: int, width: int = 16, temporal_kernel: int = 1, in_channels: int = 3,
        depth: int = VGG_DEPTH, dropout: float = 0.0) -> FrameStack:
    """``depth`` keeps the first conv layers only (each pool halves the frame)."""
    layers = [(f"conv{i}", mult, pool) for i, (mult, pool) in enumerate(_LAYERS[:depth], start=1)]
    return conv_classifier(layers, num_classes, width, temporal_kernel, in_channels, dropout)


def conv_classifier(layers: list[tuple[str, int, bool]], num_classes: int, width: int,
                    temporal_kernel: int, in_channels: int, dropout: float) -> FrameStack:
    """One :class:`ConvUnit` per layer (name, width multiplier, 2x2 pool after it), then the head:
    VGG's plan, which C3D follows in 3D."""
    modules, names, cin = [], [], in_channels
    for name, mult, pool in layers:
        cout = width * mult
        modules.append(ConvUnit(cin, cout, k=temporal_kernel, pool=pool))
        names.append(name)
        cin = cout
    return classifier_stack(modules, names, cin, num_classes, dropout)
