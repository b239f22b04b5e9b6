"""C3D-style stack (Tran et al. 2015) made causal: every conv looks back ``temporal_kernel`` frames.

Differences from the original, forced by frame-step processing: no temporal pooling (every module
emits one output per input tick) and GroupNorm after each conv; widths scale with ``width``.
"""

from __future__ import annotations

from sideways_cli.models.stack import FrameStack
from sideways_cli.models.vgg import conv_classifier

# C3D's conv1, conv2, conv3a/b, conv4a/b, conv5a/b with its spatial pools, widths relative to conv1
_LAYERS = [("conv1", 1, True), ("conv2", 2, True), ("conv3a", 4, False), ("conv3b", 4, True),
           ("conv4a", 8, False), ("conv4b", 8, True), ("conv5a", 8, False), ("conv5b", 8, False)]


C3D_DEPTH = len(_LAYERS)


def c3d(num_classes: int, width: int = 8, temporal_kernel: int = 3, in_channels: int = 3,
        depth: int = C3D_DEPTH, dropout: float = 0.0) -> FrameStack:
    """``depth`` keeps the first layers only, for small inputs (each pool halves the frame)."""
    return conv_classifier(_LAYERS[:depth], num_classes, width, temporal_kernel, in_channels, dropout)
