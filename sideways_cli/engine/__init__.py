"""One shared engine, two rules: exact backprop and Sideways pseudo-gradients."""

from __future__ import annotations

from sideways_cli.engine.backprop import BackpropRule
from sideways_cli.engine.losses import CLASSIFY, Objective
from sideways_cli.engine.rule import BatchStats, GradientRule
from sideways_cli.engine.sideways import SidewaysRule
from sideways_cli.models import FrameStack


def make_rule(mode: str, model: FrameStack, pipeline: str = "reset", update: str = "clip",
              chunk: int = 1, objective: Objective = CLASSIFY) -> GradientRule:
    """The rule for ``mode``; Sideways with ``update: clip`` batches ``chunk`` ticks per module."""
    if mode == "bp":
        return BackpropRule(model, objective)
    if mode != "sideways":
        raise ValueError(f"unknown mode {mode!r}")
    if update == "clip" and chunk > 1:
        from sideways_cli.engine.sideways_batched import TickBatchedSideways

        return TickBatchedSideways(model, pipeline=pipeline, chunk=chunk, objective=objective)
    return SidewaysRule(model, pipeline=pipeline, update=update, objective=objective)


__all__ = ["BackpropRule", "BatchStats", "GradientRule", "SidewaysRule", "make_rule"]
