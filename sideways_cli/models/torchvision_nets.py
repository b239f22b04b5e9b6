"""torchvision's networks as frame-step stacks: ``model.name: "torchvision:<arch>"``.

The image classifiers (ResNets, MobileNetV3, EfficientNets, VGGs) are per-frame 2D networks, the
paper's own setting (every k = 1 in docs/sideways.md): each module folds time into the batch and
runs torchvision's layers on every frame. The video ResNets are made causal (torchvision_video.py).
The network is cut at its natural stages, each one module, and every torchvision layer keeps its
attribute name, so the stack's state dict is torchvision's with ``stack.<d>.`` in front
(weights.py maps one onto the other). torchvision builds it with ``weights=None``; pretrained
numbers come from ``model.weights``: a file, or torchvision's own weights by name
(:func:`named_weights`, fetched by weights.py through torchvision's loader). Its adaptive average
pools become means (:class:`AdaptiveMean`), which CUDA can differentiate deterministically.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from sideways_cli.models.blocks import FrameModule, batch_to_frames, frames_to_batch
from sideways_cli.models.norms import replace_batchnorm, replace_module, trainable_batchnorm
from sideways_cli.models.stack import FrameStack
from sideways_cli.models.torchvision_video import make_causal, video_modules

if TYPE_CHECKING:  # imported on use at run time (seconds)
    from torchvision.models import WeightsEnum

PREFIX = "torchvision:"

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
           "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
MOBILENETS = ("mobilenet_v3_small", "mobilenet_v3_large")
EFFICIENTNETS = tuple(f"efficientnet_b{i}" for i in range(8)) + tuple(
    f"efficientnet_v2_{s}" for s in "sml")
VGGS = tuple(f"vgg{n}{bn}" for n in (11, 13, 16, 19) for bn in ("", "_bn"))
VIDEO_NETS = ("r3d_18", "mc3_18", "r2plus1d_18")
ARCHS = RESNETS + MOBILENETS + EFFICIENTNETS + VGGS + VIDEO_NETS
# the only architectures without BatchNorms: model.norm changes nothing in them
WITHOUT_BATCHNORM = tuple(arch for arch in VGGS if not arch.endswith("_bn"))
DEFAULT_WEIGHTS = "DEFAULT"  # model.weights torchvision:DEFAULT: the architecture's DEFAULT member
# set by the adapter, never by model.args
RESERVED_ARGS = ("weights", "num_classes")


class TorchvisionError(ValueError):
    """A torchvision network that cannot be built as asked; the message says why."""


def is_torchvision(name: str) -> bool:
    return name.startswith(PREFIX)


def refuse_reserved_args(name: str, args: dict[str, Any]) -> None:
    """TorchvisionError if ``model.args`` sets an argument the adapter sets itself."""
    reserved = [key for key in RESERVED_ARGS if key in args]
    if reserved:
        raise TorchvisionError(f"config key 'model.args.{reserved[0]}' is not for {name}: the "
                               "classes come from the dataset, pretrained weights from model.weights")


def arch_of(name: str) -> str:
    """The architecture ``model.name`` names; TorchvisionError listing the supported ones."""
    arch = name[len(PREFIX):]
    if arch not in ARCHS:
        raise TorchvisionError(f"model.name {name!r}: unknown torchvision architecture; "
                               f"supported: {', '.join(ARCHS)}")
    return arch


def named_weights(weights: str, model_name: str) -> WeightsEnum:
    """The member of torchvision's weights enum that ``model.weights`` names
    (``torchvision:<Enum>.<MEMBER>``, or ``torchvision:DEFAULT`` for the DEFAULT of model.name's
    architecture), found by torchvision's own ``get_weight`` and ``get_model_weights``; nothing is
    downloaded. TorchvisionError naming the key and the names that would do when it is unknown,
    of another architecture, or model.name is not a torchvision network."""
    if not is_torchvision(model_name):
        raise TorchvisionError(f"config key 'model.weights' is {weights}, torchvision's weights, "
                               f"which only a torchvision network takes, and model.name is "
                               f"{model_name!r}; set model.name=torchvision:<arch> or give "
                               "model.weights a state-dict file")
    from torchvision.models import get_model_weights, get_weight  # seconds to import: on use

    arch = arch_of(model_name)
    own = get_model_weights(arch)
    choices = ", ".join([f"{PREFIX}{own.__name__}.{m.name}" for m in own]
                        + [f"{PREFIX}{DEFAULT_WEIGHTS} ({own.DEFAULT.name})"])
    name = weights[len(PREFIX):]
    if name == DEFAULT_WEIGHTS:
        return own.DEFAULT
    try:
        member = get_weight(name)
    except (ValueError, KeyError):  # no such enum ('Enum.MEMBER' or not), no such member
        raise TorchvisionError(f"config key 'model.weights': torchvision has no weights {name!r}; "
                               f"{model_name}'s are {choices}") from None
    if type(member) is not own:
        raise TorchvisionError(f"config key 'model.weights': {weights} are weights of another "
                               f"architecture ({type(member).__name__}), not of model.name "
                               f"{model_name} ({own.__name__}); set model.weights to one of "
                               f"{choices}")
    return member


class AdaptiveMean(nn.Module):
    """nn.AdaptiveAvgPool2d computed as means: the same numbers, and a backward that CUDA runs
    deterministically (the adaptive pools have none, so a --deterministic run would stop at their
    first backward). Pooling to 1x1 (the heads, squeeze-and-excitation) is the mean over space;
    another size (VGG's 7x7) multiplies by each side's matrix of means. No parameters, so a
    state dict is the same with either."""

    def __init__(self, output_size: int | tuple[int | None, int | None]):
        super().__init__()
        self.output_size = _pair(output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output_size == (1, 1):
            return x.mean(dim=(-2, -1), keepdim=True)
        height, width = (mean_matrix(size, out, x) for size, out in zip(x.shape[-2:], self.output_size))
        return height @ x @ width.T

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


def mean_matrix(size: int, out: int | None, like: torch.Tensor) -> torch.Tensor:
    """[out, size] (``out`` None: ``size``, as the pool reads it): row i averages the inputs that
    adaptive pooling gives output i, [floor(i size / out), ceil((i + 1) size / out))."""
    out = size if out is None else out
    i = torch.arange(out, device=like.device)
    start, end = i * size // out, ((i + 1) * size + out - 1) // out
    j = torch.arange(size, device=like.device)
    inside = (j >= start[:, None]) & (j < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


def replace_adaptive_pools(net: nn.Module) -> None:
    """Every nn.AdaptiveAvgPool2d of ``net`` an :class:`AdaptiveMean`, in place."""
    pools = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    for name, pool in pools:
        replace_module(net, name, AdaptiveMean(pool.output_size))


class FrameLayers(FrameModule):
    """torchvision layers run on every frame (window 1), registered under their own names."""

    def __init__(self, layers: list[tuple[str, nn.Module]]):
        super().__init__()
        for name, layer in layers:
            self.add_module(name, layer)

    def valid(self, x: torch.Tensor) -> torch.Tensor:
        y = frames_to_batch(x)
        for layer in self.children():
            y = layer(y)
        return batch_to_frames(y, x.shape[2])


class FrameHead(FrameLayers):
    """Pool, flatten, classify every frame: [B, C, T, H, W] -> logits [B, K, T]."""

    def __init__(self, pool: nn.Module, name: str, classifier: nn.Module):
        super().__init__([("avgpool", pool), ("flatten", nn.Flatten(1)), (name, classifier)])

    def valid(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[0], x.shape[2]
        y = frames_to_batch(x)
        for layer in self.children():
            y = layer(y)
        return y.reshape(b, t, -1).transpose(1, 2)


def _indexed(name: str, sequential: nn.Sequential, indices: list[int]) -> FrameLayers:
    """Some layers of a Sequential under its name and their own indices: ``features.5`` stays
    ``features.5`` in the state dict."""
    part = nn.Sequential(OrderedDict((str(i), sequential[i]) for i in indices))
    return FrameLayers([(name, part)])


def _resnet(net: nn.Module) -> list[tuple[str, FrameModule]]:
    stem = FrameLayers([(n, getattr(net, n)) for n in ("conv1", "bn1", "relu", "maxpool")])
    layers = [(f"layer{i}", FrameLayers([(f"layer{i}", getattr(net, f"layer{i}"))]))
              for i in range(1, 5)]
    return [("stem", stem), *layers, ("head", FrameHead(net.avgpool, "fc", net.fc))]


def _blocks(net: nn.Module) -> list[tuple[str, FrameModule]]:
    """MobileNetV3 and EfficientNet: features.0 is the stem; each further entry of ``features``
    (an inverted residual block, or an EfficientNet stage of them) one module."""
    modules: list[tuple[str, FrameModule]] = [
        (f"features.{i}", _indexed("features", net.features, [i])) for i in range(len(net.features))]
    return [*modules, ("head", FrameHead(net.avgpool, "classifier", net.classifier))]


def _vgg(net: nn.Module) -> list[tuple[str, FrameModule]]:
    """VGG's features cut after every max-pool: one module per resolution."""
    modules: list[tuple[str, FrameModule]] = []
    start = 0
    for i, layer in enumerate(net.features):
        if isinstance(layer, nn.MaxPool2d):
            modules.append((f"features.{start}-{i}",
                            _indexed("features", net.features, list(range(start, i + 1)))))
            start = i + 1
    return [*modules, ("head", FrameHead(net.avgpool, "classifier", net.classifier))]


def _family(arch: str) -> Callable[[nn.Module], list[tuple[str, FrameModule]]]:
    if arch in RESNETS:
        return _resnet
    if arch in VGGS:
        return _vgg
    if arch in VIDEO_NETS:
        return video_modules
    return _blocks


def _torchvision_builder(arch: str) -> Callable[..., nn.Module]:
    import torchvision.models  # imported on use: it costs seconds, and most runs need none of it
    import torchvision.models.video

    return getattr(torchvision.models.video if arch in VIDEO_NETS else torchvision.models, arch)


def build_torchvision(name: str, num_classes: int, norm: str = "group",
                      args: dict[str, Any] | None = None) -> FrameStack:
    """``torchvision:<arch>`` with ``num_classes`` per-frame outputs, its BatchNorms replaced as
    ``norm`` says (norms.py), ``args`` passed to torchvision's builder."""
    arch = arch_of(name)
    args = dict(args or {})
    refuse_reserved_args(name, args)
    builder = _torchvision_builder(arch)
    call = f"torchvision.models.{arch}(weights=None, num_classes={num_classes}" + "".join(
        f", {k}={v!r}" for k, v in args.items()) + ")"
    try:
        net = builder(weights=None, num_classes=num_classes, **args)
    except Exception as exc:  # a wrong model.args: torchvision's own message, in one line
        raise TorchvisionError(f"model.name {name!r}: {call} raised {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if arch in VIDEO_NETS:
        make_causal(net)
    replace_batchnorm(net, norm)
    replace_adaptive_pools(net)
    parts = _family(arch)(net)
    stack = FrameStack([module for _, module in parts], [part for part, _ in parts])
    assert not trainable_batchnorm(stack), "every BatchNorm was replaced"
    return stack
