"""Stages: the contiguous groups of modules each process owns."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from sideways_cli.models import FrameStack
from sideways_cli.support.runtime import Autocast


def stage_ranges(sizes: list[int]) -> list[range]:
    """Modules per stage, bottom first -> each stage's module indices: [2, 3] -> [0..1], [2..4]."""
    ranges, start = [], 0
    for size in sizes:
        ranges.append(range(start, start + size))
        start += size
    return ranges


def stage_stack(model: FrameStack, modules: range) -> FrameStack:
    """The modules of one stage as a stack of their own, sharing the model's parameters."""
    return FrameStack([model[d] for d in modules], [model.names[d] for d in modules])


Spec = tuple[tuple[int, ...], torch.dtype]  # one clip's frame at a module's output: shape, dtype


def boundary_specs(specs: list[Spec], modules: range) -> tuple[Spec | None, Spec | None]:
    """What arrives at a stage's lower boundary (the activations of the module below it) and
    its upper one (messages shaped like its top module's output); None at the network's ends."""
    below = specs[modules.start - 1] if modules.start > 0 else None
    above = specs[modules.stop - 1] if modules.stop < len(specs) else None
    return below, above


@torch.no_grad()
def output_specs(model: FrameStack, frame: tuple[int, ...], autocast: Autocast = nullcontext,
                 device: torch.device | str = "cpu") -> list[Spec]:
    """Each module's output frame for one clip, from a zero input frame of shape ``frame`` [C, H, W]
    run through the modules' tick path under ``autocast`` (which sets the dtypes on the wire)."""
    x = torch.zeros(1, *frame, device=device, dtype=model.dtype)
    specs = []
    for module in model.stack:
        with autocast():
            x = module.forward_window(x.unsqueeze(2).expand(-1, -1, module.window, *x.shape[2:]))
        specs.append((tuple(x.shape[1:]), x.dtype))
    return specs
