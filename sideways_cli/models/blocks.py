"""Frame-step modules: the building blocks every network in the zoo is a stack of.

A module maps a window of its last ``window`` inputs to one output frame. Tensors are laid out
[B, C, T, H, W] (time is always dim 2; a head's output is [B, K, T]). Each module implements a single
``valid`` computation over time (no temporal padding: L inputs give L - window + 1 outputs), so that

* the whole-clip path is ``valid(zero-pad(x))``: a causal network over the clip, and
* the tick path is ``valid(window)``: exactly one output frame from the module's register window,

and both compute the same function by construction (docs/sideways.md, property 1).
Normalisation is per sample, so no result depends on how frames are batched: GroupNorm per frame
after convolutions whose weights are standardised (Qiao et al. 2019, "Weight Standardization").
GroupNorm alone trains far slower than BatchNorm on motion; with standardised weights it matches
BatchNorm (docs/engine.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W] so 2D layers treat each frame independently."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def batch_to_frames(x: torch.Tensor, t: int) -> torch.Tensor:
    """Inverse of :func:`frames_to_batch`."""
    bt, c, h, w = x.shape
    return x.reshape(bt // t, t, c, h, w).transpose(1, 2)


def group_norm(channels: int) -> nn.GroupNorm:
    """Groups of 8 channels. One channel per group (instance norm) would standardise each channel
    over the few pixels of a late feature map, leaving global pooling almost nothing to read."""
    return nn.GroupNorm(num_groups=max(1, channels // 8), num_channels=channels)


class FrameModule(nn.Module):
    """A module of the frame-step stack with a causal temporal window of ``window`` inputs."""

    window: int = 1

    def valid(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs for every full window of ``x``: time length L -> L - window + 1."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Causal whole-clip path: time length T -> T, missing history is zeros."""
        if self.window > 1:
            pad = [0, 0] * (x.dim() - 3) + [self.window - 1, 0]
            x = F.pad(x, pad)
        return self.valid(x)

    def forward_window(self, window: torch.Tensor) -> torch.Tensor:
        """Tick path: a [B, C, window, ...] register window -> one output frame [B, C', ...]."""
        return self.valid(window).select(2, 0)

    def first_conv(self) -> CausalConv | None:
        """The module's temporal convolution when it is the only thing that mixes frames and comes
        first, so that ``valid(x) == after_conv(first_conv()(x), x[:, :, window-1:])``; else None.

        An executor can then form Sideways' message (the input gradient summed over the window's
        slots) from the conv's output gradient in one 2D pass: the conv is linear in each slot.
        """
        return None

    def after_conv(self, z: torch.Tensor, newest: torch.Tensor) -> torch.Tensor:
        """The per-frame rest of the module: conv output ``z`` and the windows' newest inputs."""
        raise NotImplementedError


def standardize(weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each output filter rescaled to zero mean and unit variance over its fan-in."""
    dims = tuple(range(1, weight.dim()))
    mean = weight.mean(dim=dims, keepdim=True)
    std = weight.std(dim=dims, keepdim=True, unbiased=False)
    return (weight - mean) / (std + eps)


class CausalConv(nn.Module):
    """A weight-standardised 3x3 spatial convolution with a temporal extent of ``k`` frames and no
    temporal padding.

    k = 1 runs as a 2D convolution over frames folded into the batch, which is what a per-frame
    layer is and is markedly faster on CPU than a Conv3d with a unit temporal kernel.
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, kernel: int = 3):
        super().__init__()
        self.k = k
        pad = kernel // 2
        if k == 1:
            self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, bias=False)
        else:
            self.conv = nn.Conv3d(cin, cout, (k, kernel, kernel), stride=(1, stride, stride),
                                  padding=(0, pad, pad), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = standardize(self.conv.weight)
        if self.k == 1:
            y = F.conv2d(frames_to_batch(x), weight, None, self.conv.stride, self.conv.padding)
            return batch_to_frames(y, x.shape[2])
        return F.conv3d(x, weight, None, self.conv.stride, self.conv.padding)

    def slot_summed_input_grad(self, grad_out: torch.Tensor, input_size: torch.Size,
                               filled: int) -> torch.Tensor:
        """Input gradient [N, C, H, W] summed over the newest ``filled`` temporal slots, for output
        gradients [N, C', H', W'] of N windows: the convolution is linear in each slot, so this is
        one 2D transposed convolution with those slots' kernels summed."""
        weight = standardize(self.conv.weight.detach())
        if self.k > 1:
            weight = weight[:, :, self.k - filled:].sum(dim=2)
        # under AMP the gradients are bf16 and this op is outside autocast's casting lists: the
        # fp32 weights must meet them in their dtype (the master weights stay fp32)
        weight = weight.to(grad_out.dtype)
        return torch.nn.grad.conv2d_input(input_size, weight, grad_out, stride=self.conv.stride[-1],
                                          padding=self.conv.padding[-1])


class PerFrame(nn.Module):
    """Applies a 2D layer (norm, activation, pooling) to every frame independently."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batch_to_frames(self.body(frames_to_batch(x)), x.shape[2])


class ConvUnit(FrameModule):
    """conv (temporal window k) -> GroupNorm -> ReLU [-> 2x2 max-pool]: one VGG/C3D layer."""

    def __init__(self, cin: int, cout: int, k: int = 1, pool: bool = False):
        super().__init__()
        self.window = k
        self.conv = CausalConv(cin, cout, k)
        post: list[nn.Module] = [group_norm(cout), nn.ReLU(inplace=True)]
        if pool:
            post.append(nn.MaxPool2d(2))
        self.post = PerFrame(*post)

    def valid(self, x: torch.Tensor) -> torch.Tensor:
        return self.after_conv(self.conv(x), x[:, :, self.window - 1:])

    def first_conv(self) -> CausalConv:
        return self.conv

    def after_conv(self, z: torch.Tensor, newest: torch.Tensor) -> torch.Tensor:
        return self.post(z)


class ResidualBlock(FrameModule):
    """ResNet basic block as one module; the temporal window sits in its first convolution."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1):
        super().__init__()
        self.window = k
        self.conv1 = CausalConv(cin, cout, k, stride=stride)
        self.mid = PerFrame(group_norm(cout), nn.ReLU(inplace=True))
        self.conv2 = CausalConv(cout, cout, 1)
        self.norm2 = PerFrame(group_norm(cout))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(CausalConv(cin, cout, 1, stride=stride, kernel=1),
                                          PerFrame(group_norm(cout)))

    def valid(self, x: torch.Tensor) -> torch.Tensor:
        return self.after_conv(self.conv1(x), x[:, :, self.window - 1:])

    def first_conv(self) -> CausalConv:
        return self.conv1

    def after_conv(self, z: torch.Tensor, newest: torch.Tensor) -> torch.Tensor:
        # the residual path carries the newest frame of each window
        return F.relu(self.norm2(self.conv2(self.mid(z))) + self.shortcut(newest))


class ClassifierHead(FrameModule):
    """Per-frame global average pool -> dropout -> linear: [B, C, T, H, W] -> logits [B, K, T]."""

    def __init__(self, cin: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)

    def valid(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(3, 4)).transpose(1, 2)  # [B, T, C]
        return self.fc(self.drop(pooled)).transpose(1, 2)
