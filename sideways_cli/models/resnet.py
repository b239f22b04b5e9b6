"""ResNet-18-style stack: a stem module, eight basic blocks (each one module), and the head."""

from __future__ import annotations

from sideways_cli.models.blocks import ClassifierHead, ConvUnit, ResidualBlock
from sideways_cli.models.stack import FrameStack


def resnet18(num_classes: int, width: int = 16, temporal_kernel: int = 1, in_channels: int = 3,
             dropout: float = 0.0) -> FrameStack:
    modules, names = [ConvUnit(in_channels, width, k=temporal_kernel)], ["stem"]
    cin = width
    for stage, mult in enumerate([1, 2, 4, 8], start=1):
        cout = width * mult
        for block in (1, 2):
            stride = 2 if (block == 1 and stage > 1) else 1
            modules.append(ResidualBlock(cin, cout, k=temporal_kernel, stride=stride))
            names.append(f"layer{stage}.{block}")
            cin = cout
    modules.append(ClassifierHead(cin, num_classes, dropout))
    names.append("head")
    return FrameStack(modules, names)
