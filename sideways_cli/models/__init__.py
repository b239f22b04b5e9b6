"""The model zoo, chosen by ``model.name``: classifiers for ``task: classify``, the
encoder-decoder for ``task: reconstruct``; and the building blocks for networks of your own
(``models/user.py`` loads them)."""

from __future__ import annotations

from typing import Callable

from sideways_cli.models.autoencoder import AUTOENCODER_LEVELS, autoencoder
from sideways_cli.models.blocks import (CausalConv, ClassifierHead, ConvUnit, FrameModule, PerFrame,
                                        ResidualBlock, batch_to_frames, frames_to_batch, group_norm)
from sideways_cli.models.c3d import C3D_DEPTH, c3d
from sideways_cli.models.norms import FrameGroupNorm, FrozenBatchNorm
from sideways_cli.models.resnet import RESNET18_DEPTH, resnet18
from sideways_cli.models.stack import FrameStack
from sideways_cli.models.vgg import VGG_DEPTH, vgg

# classifiers: the first argument is the number of classes, the output [B, K, T] logits
ZOO: dict[str, Callable[..., FrameStack]] = {"vgg": vgg, "c3d": c3d, "resnet18": resnet18}
# reconstructors: the first argument is the number of image channels, the output [B, C, T, H, W]
RECONSTRUCTORS: dict[str, Callable[..., FrameStack]] = {"autoencoder": autoencoder}
MODELS = {**ZOO, **RECONSTRUCTORS}
# The largest `model.depth`: modules below the head of each classifier, levels of the encoder.
FULL_DEPTH: dict[str, int] = {"vgg": VGG_DEPTH, "c3d": C3D_DEPTH, "resnet18": RESNET18_DEPTH,
                              "autoencoder": AUTOENCODER_LEVELS}


def build_model(name: str, outputs: int, **options) -> FrameStack:
    """``outputs``: classes for a classifier, image channels for a reconstructor."""
    if name not in MODELS:
        raise ValueError(f"unknown model.name {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](outputs, **options)


# the public surface for writing networks of your own (docs/networks.md, "Bring your own network")
__all__ = ["FULL_DEPTH", "MODELS", "RECONSTRUCTORS", "ZOO", "FrameStack", "build_model",
           "FrameModule", "CausalConv", "ConvUnit", "ResidualBlock", "ClassifierHead", "PerFrame",
           "group_norm", "frames_to_batch", "batch_to_frames", "FrozenBatchNorm", "FrameGroupNorm"]
