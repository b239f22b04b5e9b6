"""The model zoo, chosen by ``model.name``."""

from __future__ import annotations

from typing import Callable

from sideways_cli.models.c3d import c3d
from sideways_cli.models.resnet import resnet18
from sideways_cli.models.stack import FrameStack
from sideways_cli.models.vgg import vgg

ZOO: dict[str, Callable[..., FrameStack]] = {"vgg": vgg, "c3d": c3d, "resnet18": resnet18}


def build_model(name: str, num_classes: int, **options) -> FrameStack:
    if name not in ZOO:
        raise ValueError(f"unknown model.name {name!r}; choose one of {', '.join(ZOO)}")
    return ZOO[name](num_classes, **options)


__all__ = ["ZOO", "FrameStack", "build_model"]
