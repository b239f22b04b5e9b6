"""A rule restored from its state_dict (through a file, like a checkpoint) continues exactly as
the rule that never stopped: what between_clips: continuous and update: every N ticks carry over."""

from __future__ import annotations

import io

import pytest
import torch

from sideways_cli.engine import BackpropRule, Schedule, SidewaysRule
from sideways_cli.engine.sideways_chunked import ChunkedSideways
from sideways_cli.models import FrameStack
from tiny import random_clips, tiny_network

RULES = {
    "tick, continuous": lambda m: SidewaysRule(m, between_clips="continuous"),
    "tick, every 5 ticks": lambda m: SidewaysRule(m, between_clips="reset", update="every 5 ticks"),
    "tick, continuous, every 4 ticks": lambda m: SidewaysRule(m, between_clips="continuous",
                                                             update="every 4 ticks"),
    "chunked, continuous": lambda m: ChunkedSideways(m, between_clips="continuous", chunk=4),
    "chunked, reset": lambda m: ChunkedSideways(m, between_clips="reset", chunk=4),
    # the staleness dial: kept inputs and routed messages carried over
    "tick, continuous, stash full": lambda m: SidewaysRule(m, between_clips="continuous",
                                                          schedule=Schedule.of(m, "full")),
    "tick, every 3 ticks, stash 2": lambda m: SidewaysRule(m, update="every 3 ticks",
                                                          schedule=Schedule.of(m, 2)),
    "chunked, continuous, stash full": lambda m: ChunkedSideways(m, between_clips="continuous", chunk=3,
                                                                 schedule=Schedule.of(m, "full")),
    "bp": BackpropRule,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny() -> FrameStack:
    return tiny_network("c3d", depth=3, dtype=torch.float32)


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return random_clips(count, frames=7)


def trainer(model: FrameStack):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)

    def apply_update() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer, apply_update


def through_a_file(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("name", list(RULES))
def test_a_restored_rule_continues_exactly(name):
    data = batches(4)
    model = tiny()
    rule, (optimizer, step) = RULES[name](model), trainer(model)
    for clip, labels in data[:2]:
        rule.train_batch(clip, labels, step)
    saved = through_a_file({"rule": rule.state_dict(), "model": model.state_dict(),
                            "optimizer": optimizer.state_dict()})
    expected = [rule.train_batch(clip, labels, step).loss for clip, labels in data[2:]]

    restored = tiny()
    restored.load_state_dict(saved["model"])
    rule2, (optimizer2, step2) = RULES[name](restored), trainer(restored)
    optimizer2.load_state_dict(saved["optimizer"])
    rule2.load_state_dict(saved["rule"])
    assert [rule2.train_batch(clip, labels, step2).loss for clip, labels in data[2:]] == expected
    for a, b in zip(model.state_dict().values(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_continuous_state_is_not_empty():
    # the property above would hold trivially if nothing were carried over
    model = tiny()
    rule = ChunkedSideways(model, between_clips="continuous", chunk=4)
    clip, labels = batches(1)[0]
    rule.train_batch(clip, labels, lambda: None)
    state = rule.state_dict()
    assert state["fed"] == 7 and any(state["registers"]) and any(state["mailbox"])
