"""One shared engine, two rules: exact backprop and Sideways pseudo-gradients."""

from __future__ import annotations

from contextlib import nullcontext

from sideways_cli.engine.backprop import BackpropRule
from sideways_cli.engine.clock import Schedule, runs_chunked
from sideways_cli.engine.losses import CLASSIFY, Objective
from sideways_cli.engine.rule import BatchStats, GradientRule
from sideways_cli.engine.sideways import SidewaysRule
from sideways_cli.engine.sideways_chunked import ChunkedSideways
from sideways_cli.models import FrameStack
from sideways_cli.support.runtime import Autocast


def make_rule(mode: str, model: FrameStack, between_clips: str = "reset", update: str = "clip",
              chunk: int = 1, objective: Objective = CLASSIFY,
              autocast: Autocast = nullcontext, stash: int | str = 0) -> GradientRule:
    """The rule for ``mode``; Sideways with ``update: clip`` batches ``chunk`` ticks per module
    (``clock.runs_chunked``) and pairs messages with activations as ``stash`` says
    (``clock.Schedule``). ``autocast`` is the context its forward passes run in (bf16 with
    AMP)."""
    if mode == "bp":
        return BackpropRule(model, objective, autocast)
    if mode != "sideways":
        raise ValueError(f"unknown mode {mode!r}")
    schedule = Schedule.of(model, stash)
    if runs_chunked(update, chunk):
        return ChunkedSideways(model, between_clips=between_clips, chunk=chunk, objective=objective,
                               autocast=autocast, schedule=schedule)
    return SidewaysRule(model, between_clips=between_clips, update=update, objective=objective,
                        autocast=autocast, schedule=schedule)


__all__ = ["BackpropRule", "BatchStats", "GradientRule", "SidewaysRule", "ChunkedSideways",
           "Schedule", "make_rule"]
