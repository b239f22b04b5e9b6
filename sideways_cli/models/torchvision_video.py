"""torchvision's video ResNets (r3d_18, mc3_18, r2plus1d_18) made causal frame-step modules.

torchvision pads every temporal convolution on both sides (a frame would see the next one) and
strides time by 2 in layers 2-4 (one output for two frames, where this engine needs one per
frame). Here every Conv3d has temporal padding 0 and temporal stride 1, so a convolution of
temporal kernel kt turns L frames into L - kt + 1: the module's ``valid``. Widths and spatial
strides stay torchvision's, and so do the attribute names, so that the stack's state-dict keys are
``stack.<d>.`` + torchvision's (``stack.1.layer1.0.conv1.0.weight``).
"""

from __future__ import annotations

import torch
from torch import nn

from sideways_cli.models.blocks import FrameModule


def make_causal(net: nn.Module) -> None:
    """No temporal padding and no temporal stride in any Conv3d of ``net``, in place."""
    for layer in net.modules():
        if isinstance(layer, nn.Conv3d):
            if layer.dilation[0] != 1 or isinstance(layer.padding, str):
                raise ValueError(f"{layer}: a dilated or 'same'-padded temporal convolution")
            layer.stride = (1, *layer.stride[1:])
            layer.padding = (0, *layer.padding[1:])


def temporal_reduction(module: nn.Module) -> int:
    """Frames lost by running ``module`` without padding: its temporal convolutions run one after
    another (a residual block's downsample is 1x1x1 and adds nothing)."""
    return sum(layer.kernel_size[0] - 1 for layer in module.modules() if isinstance(layer, nn.Conv3d))


class CausalBlock(nn.Module):
    """A torchvision BasicBlock or Bottleneck over ``valid`` time: its branch (conv1, conv2[,
    conv3]) shortens the clip by ``reduction`` frames, so the shortcut takes the newest frames of
    each window, ``x[:, :, reduction:]``, for the sum to add up frames of the same time."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.branch = [name for name, _ in block.named_children() if name.startswith("conv")]
        for name in self.branch:
            self.add_module(name, getattr(block, name))
        self.relu = block.relu
        self.downsample = block.downsample
        self.reduction = temporal_reduction(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for name in self.branch:
            out = getattr(self, name)(out)
        shortcut = x[:, :, self.reduction:]
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.relu(out + shortcut)


class CausalLayers(FrameModule):
    """One torchvision child (the stem, or a residual stage ``layerN`` of CausalBlocks) under its
    own name; the window is one frame plus what its temporal convolutions consume."""

    def __init__(self, name: str, body: nn.Module):
        super().__init__()
        self.body_name = name
        self.add_module(name, body)
        self.window = 1 + temporal_reduction(body)

    def valid(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.body_name)(x)


class VideoHead(FrameModule):
    """torchvision's average pool over space only (over time it would mix frames), then ``fc``
    per frame: [B, C, T, H, W] -> logits [B, K, T]. The pool is a mean, not the adaptive pool,
    which CUDA cannot differentiate deterministically; it has no parameters, so the state dict
    is torchvision's either way."""

    def __init__(self, fc: nn.Linear):
        super().__init__()
        self.fc = fc

    def valid(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(-2, -1)).transpose(1, 2)  # [B, T, C]
        return self.fc(pooled).transpose(1, 2)


def video_modules(net: nn.Module) -> list[tuple[str, FrameModule]]:
    """(name, module) of a causal VideoResNet: stem, layer1..layer4, head."""
    modules: list[tuple[str, FrameModule]] = [("stem", CausalLayers("stem", net.stem))]
    for i in range(1, 5):
        name = f"layer{i}"
        blocks = nn.Sequential(*[CausalBlock(block) for block in getattr(net, name)])
        modules.append((name, CausalLayers(name, blocks)))
    modules.append(("head", VideoHead(net.fc)))
    return modules
