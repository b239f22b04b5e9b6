"""Normalisation that keeps a frame's output its own: ``model.norm: group | frozen``.

BatchNorm in training mode normalises with statistics of the whole batch. Here a batch is a set of
frames that the engine chooses (one register window on the tick path, a whole clip on the clip
path, several clips together), so a frame's output would depend on its neighbours and the tick
path would not equal the whole clip (docs/sideways.md, property 1). A network taken from elsewhere
(torchvision) has its BatchNorms replaced by one of:

* ``group``: a per-frame GroupNorm after a weight-standardised convolution (the zoo's choice,
  blocks.py): trains from scratch as well as BatchNorm;
* ``frozen``: BatchNorm with its running statistics fixed, an affine map per channel: keeps a
  pretrained network's numbers, for fine-tuning.

:func:`trainable_batchnorm` finds what is left, so a network with one is refused, not trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sideways_cli.config import NORMS
from sideways_cli.models.blocks import standardize


class StandardizedConv2d(nn.Conv2d):
    """A Conv2d whose filters are standardised on every call; its parameter is still ``weight``,
    so the state dict keeps the original network's keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, standardize(self.weight), self.bias)


class StandardizedConv3d(nn.Conv3d):
    """The Conv3d counterpart of :class:`StandardizedConv2d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, standardize(self.weight), self.bias)


def standardized(conv: nn.Conv2d | nn.Conv3d) -> nn.Conv2d | nn.Conv3d:
    """The same convolution (arguments, weights: the very Parameters) with standardised filters."""
    cls = StandardizedConv3d if isinstance(conv, nn.Conv3d) else StandardizedConv2d
    # skip_init: the weights are replaced just below, drawing fresh ones would only cost time
    new = torch.nn.utils.skip_init(cls, conv.in_channels, conv.out_channels, conv.kernel_size,
                                   stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                                   groups=conv.groups, bias=conv.bias is not None,
                                   padding_mode=conv.padding_mode, device=conv.weight.device,
                                   dtype=conv.weight.dtype)
    new.weight = conv.weight
    if conv.bias is not None:
        new.bias = conv.bias
    new.train(conv.training)
    return new


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm over one frame: a [B, C, T, H, W] input is normalised frame by frame (over a clip
    it would mix the frames, and the newest frame's output would see the future of older ones)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            return super().forward(x)
        b, c, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


def group_count(channels: int) -> int:
    """blocks.group_norm's groups of 8 channels; where 8 does not divide the channels (R(2+1)D's
    230, 460 or 921), the most groups of at least 8 channels that do."""
    most = max(1, channels // 8)
    return next(g for g in range(most, 0, -1) if channels % g == 0)


class FrozenBatchNorm(nn.Module):
    """BatchNorm that always normalises with its running statistics: an affine map per channel,
    whatever ``train()`` says, so no frame sees another. weight and bias stay trainable; the
    statistics are buffers under BatchNorm's names (num_batches_tracked too), so a BatchNorm's
    state dict loads as it is. Any input [N, C, ...]: 2D frames or 5D clips."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def frozen(bn: _BatchNorm) -> FrozenBatchNorm:
    """``bn`` as a FrozenBatchNorm holding its current affine parameters and statistics."""
    new = FrozenBatchNorm(bn.num_features, bn.eps).to(device=_device(bn))
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight)
            new.bias.copy_(bn.bias)
        if bn.running_mean is not None:
            new.running_mean.copy_(bn.running_mean)
            new.running_var.copy_(bn.running_var)
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


def grouped(bn: _BatchNorm) -> FrameGroupNorm:
    """A per-frame GroupNorm in place of ``bn``, starting from its affine parameters (a network
    that zero-initialises its last norm of each residual branch keeps that)."""
    channels = bn.num_features
    new = FrameGroupNorm(group_count(channels), channels, eps=bn.eps).to(device=_device(bn))
    if bn.affine:
        with torch.no_grad():
            new.weight.copy_(bn.weight)
            new.bias.copy_(bn.bias)
    return new


def _device(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), torch.empty(0))
    return tensor.device


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``model``'s submodule ``name`` (a dotted path) is."""
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent), attribute, new)


def replace_batchnorm(model: nn.Module, norm: str) -> nn.Module:
    """Every BatchNorm of ``model`` replaced in place (``norm`` one of NORMS); with ``group`` the
    convolution just before each (in the order the layers were registered, which is the order
    they run in torchvision's networks) becomes weight-standardised. Returns ``model``."""
    if norm not in NORMS:
        raise ValueError(f"model.norm must be one of {', '.join(NORMS)}, got {norm!r}")
    leaves = [(name, m) for name, m in model.named_modules() if not any(m.children())]
    for i, (name, layer) in enumerate(leaves):
        if not isinstance(layer, _BatchNorm):
            continue
        if norm == "frozen":
            replace_module(model, name, frozen(layer))
            continue
        replace_module(model, name, grouped(layer))
        before_name, before = leaves[i - 1] if i else ("", None)
        if isinstance(before, (nn.Conv2d, nn.Conv3d)) and \
                not isinstance(before, (StandardizedConv2d, StandardizedConv3d)):
            replace_module(model, before_name, standardized(before))
    return model


def trainable_batchnorm(model: nn.Module) -> list[tuple[int, str, str]]:
    """(module index, module name, layer name inside it) of every BatchNorm in a FrameStack that
    would normalise with batch statistics when training (a plain nn.BatchNorm1d/2d/3d does, in
    ``train()`` mode, whatever its settings). Empty: the network is per frame and per sample as
    far as normalisation goes."""
    found = []
    names = getattr(model, "names", None)
    for d, module in enumerate(getattr(model, "stack", [model])):
        for layer_name, layer in module.named_modules():
            if isinstance(layer, _BatchNorm):
                found.append((d, names[d] if names else str(d), layer_name))
    return found


# the fixes `sideways check` gives for a trainable BatchNorm, by where the network comes from
FIX_TORCHVISION = "set model.norm: group or frozen"
FIX_BUILDER = ("use GroupNorm (sideways_cli.models.group_norm) or "
               "sideways_cli.models.FrozenBatchNorm instead")
