"""ResNet-18-style stack: a stem module, eight basic blocks (each one module), and the head."""

from __future__ import annotations

from sideways_cli.models.blocks import ConvUnit, ResidualBlock
from sideways_cli.models.stack import FrameStack, classifier_stack


RESNET18_DEPTH = 9  # the stem and eight basic blocks


def resnet18(num_classes: int, width: int = 16, temporal_kernel: int = 1, in_channels: int = 3,
             depth: int = RESNET18_DEPTH, dropout: float = 0.0) -> FrameStack:
    """``depth`` keeps the stem and the first ``depth - 1`` blocks."""
    modules, names = [ConvUnit(in_channels, width, k=temporal_kernel)], ["stem"]
    cin = width
    blocks = [(stage, block, width * mult) for stage, mult in enumerate([1, 2, 4, 8], start=1)
              for block in (1, 2)]
    for stage, block, cout in blocks[:depth - 1]:
        stride = 2 if (block == 1 and stage > 1) else 1
        modules.append(ResidualBlock(cin, cout, k=temporal_kernel, stride=stride))
        names.append(f"layer{stage}.{block}")
        cin = cout
    return classifier_stack(modules, names, cin, num_classes, dropout)
