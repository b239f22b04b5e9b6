"""The frame-step contract as a gate: ``train`` runs the per-module properties (no gradients, no
costs: a second or two) on a builder of the user's own before its first step, and refuses one that
breaks them. ``sideways check`` (``analyses.check``) shows every property, with the same rows."""

from __future__ import annotations

import torch

from sideways_cli.config import Config
from sideways_cli.engine.contract import Row, causes, contract_rows, in_float64
from sideways_cli.engine.losses import OBJECTIVES
from sideways_cli.models import FrameStack
from sideways_cli.models.norms import FIX_BUILDER, FIX_TORCHVISION
from sideways_cli.models.torchvision_nets import is_torchvision
from sideways_cli.run.build import IMAGE_CHANNELS, build_network
from sideways_cli.support.errors import UserError

CHECK_CLIPS = 2  # the fewest that can show one clip depending on another


def batchnorm_fix(cfg: Config) -> str:
    return FIX_TORCHVISION if is_torchvision(cfg.model.name) else FIX_BUILDER


def probe_clip(cfg: Config, model: FrameStack, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random clip long enough that every module sees a full window and its zero-padded start,
    at the configured frame size, and random labels."""
    frames = max(4, max(model.windows) + 2)
    g = torch.Generator().manual_seed(cfg.seed)
    clip = torch.randn(CHECK_CLIPS, IMAGE_CHANNELS, frames, cfg.data.size, cfg.data.size,
                       generator=g)
    labels = torch.randint(0, max(num_classes, 1), (CHECK_CLIPS,), generator=g)
    return clip, labels


def network_rows(cfg: Config, model: FrameStack, num_classes: int, gradients: bool) -> list[Row]:
    """The contract's rows for ``model`` (``cfg``'s network), checked in float64 on a probe clip;
    the gradient properties only if ``gradients``."""
    clip, labels = probe_clip(cfg, model, num_classes)
    probe = in_float64(model, clip)
    return contract_rows(probe, clip.to(probe.dtype), labels, OBJECTIVES[cfg.task],
                         batchnorm_fix(cfg), gradients=gradients)


def refuse_broken_builder(cfg: Config, num_classes: int, model: FrameStack | None = None) -> None:
    """What ``train`` runs on a builder of the user's own before its first step: the per-module
    properties, in a second or two; the first failure is one UserError saying what to change.
    ``model``: the run's network, as built from ``cfg`` (left unchanged: the checks run on a
    copy); when not given, it is built here. The random streams are left as they were, so a run
    is the same with or without it."""
    with torch.random.fork_rng(devices=[]):
        model = model if model is not None else build_network(cfg, num_classes)
        rows = network_rows(cfg, model, num_classes, gradients=False)
    broken = causes(rows)
    if broken:
        raise UserError(f"model.name {cfg.model.name!r} breaks the frame-step contract: "
                        f"{failure_line(broken[0])} (`sideways check` shows every property)")


def failure_line(row: Row) -> str:
    where = "the network" if row.module is None else f"module {row.module} ({row.name})"
    return f"{where}, {row.property}: {row.detail}; {row.fix}"
