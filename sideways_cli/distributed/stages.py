"""Stages: the contiguous groups of modules each process owns."""

from __future__ import annotations

from sideways_cli.models import FrameStack


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
