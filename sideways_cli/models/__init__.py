"""The model zoo, chosen by ``model.name``."""

from __future__ import annotations

from typing import Callable

from sideways_cli.models.c3d import C3D_DEPTH, c3d
from sideways_cli.models.resnet import RESNET18_DEPTH, resnet18
from sideways_cli.models.stack import FrameStack
from sideways_cli.models.vgg import VGG_DEPTH, vgg

ZOO: dict[str, Callable[..., FrameStack]] = {"vgg": vgg, "c3d": c3d, "resnet18": resnet18}
# Modules below the head in each full network: the largest `model.depth`.
FULL_DEPTH: dict[str, int] = {"vgg": VGG_DEPTH, "c3d": C3D_DEPTH, "resnet18": RESNET18_DEPTH}


def build_model(name: str, num_classes: int, **options) -> FrameStack:
    if name not in ZOO:
        raise ValueError(f"unknown model.name {name!r}; choose one of {', '.join(ZOO)}")
    return ZOO[name](num_classes, **options)


__all__ = ["FULL_DEPTH", "ZOO", "FrameStack", "build_model"]
