"""ChunkedSideways is SidewaysRule run a macro tick at a time: same numbers, for any chunk."""

from __future__ import annotations

import functools

import pytest
import torch

from sideways_cli.engine.rule import BatchStats
from sideways_cli.engine.sideways import SidewaysRule
from sideways_cli.engine.sideways_chunked import ChunkedSideways
from sideways_cli.models import ZOO, FrameStack
from tiny import random_clips, tiny_network

ZOO_NAMES = sorted(ZOO)
BATCHES = {"reset": 1, "continuous": 3}  # continuous: the pipeline carries over between batches
Record = list[tuple[BatchStats, list[list[torch.Tensor | None]]]]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny(name: str, k: int) -> FrameStack:
    # c3d: D = 4, so that T = 7 > 2(D-1) gives every module ticks that meet a message
    return tiny_network(name, k, **({"depth": 3} if name == "c3d" else {}))


def clips(t: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return random_clips(count, t, dtype=torch.float64)


def train(rule_class: type, name: str, k: int, t: int, mode: str, **options) -> Record:
    """Feed the batches to one rule object, stepping SGD in between; record every update's grads."""
    model = tiny(name, k)
    rule = rule_class(model, between_clips=mode, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    record: Record = []
    for batch, labels in clips(t, BATCHES[mode]):
        grads: list[list[torch.Tensor | None]] = []

        def apply_update() -> None:
            grads.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        record.append((rule.train_batch(batch, labels, apply_update), grads))
    return record


@functools.cache
def tick_rule(name: str, k: int, t: int, mode: str) -> Record:
    return train(SidewaysRule, name, k, t, mode)


def assert_same(actual: Record, expected: Record) -> None:
    assert len(actual) == len(expected)
    for (stats, grads), (want_stats, want_grads) in zip(actual, expected):
        assert (stats.losses, stats.frames, stats.updates) == \
            (want_stats.losses, want_stats.frames, want_stats.updates)
        assert stats.loss == pytest.approx(want_stats.loss, rel=1e-10, abs=0)
        assert len(grads) == len(want_grads)
        for update, want_update in zip(grads, want_grads):
            for g, want in zip(update, want_update):
                if want is None:  # a module no message reached keeps its .grad untouched
                    assert g is None
                    continue
                # the batched kernels sum over ticks in another order: entries where many terms
                # cancel carry round-off of the tensor's scale, hence the (tiny) absolute term
                scale = want.abs().max().item()
                torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12 * scale)


@pytest.mark.parametrize("mode", ["reset", "continuous"])
@pytest.mark.parametrize("t", [3, 7])  # 3 < D for every model; 7 is not a multiple of 2, 3, 5
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", ZOO_NAMES)
@pytest.mark.parametrize("chunk", [1, 2, 3, 5, "T", 100])  # 100 > every batch's ticks
def test_same_numbers_as_the_tick_rule(name, k, t, mode, chunk):
    chunk = t if chunk == "T" else chunk
    actual = train(ChunkedSideways, name, k, t, mode, chunk=chunk)
    assert_same(actual, tick_rule(name, k, t, mode))


def test_long_clip_with_every_phase_in_every_module():
    """T > 2(D-1): each module fills, meets messages at its own ticks, then drains."""
    actual = train(ChunkedSideways, "vgg", 3, 15, "reset", chunk=4)
    assert_same(actual, train(SidewaysRule, "vgg", 3, 15, "reset"))


def test_queues_do_not_grow_with_the_clip():
    """Between macro ticks each module holds O(1) pending activations and messages."""
    model = tiny("vgg", 3)
    rule = ChunkedSideways(model, chunk=4)
    sizes = []
    backward_macro = rule.backward_macro

    def recording(macro, graphs) -> None:
        backward_macro(macro, graphs)
        sizes.append(max(len(q) for q in rule.pending_inputs[1:] + rule.pending_messages))

    rule.backward_macro = recording
    (batch, labels), = clips(40, 1)
    rule.train_batch(batch, labels, apply_update=lambda: None)
    assert len(sizes) == 12 and max(sizes) <= 2


def test_refuses_updates_within_a_batch():
    with pytest.raises(ValueError, match="update: clip"):
        ChunkedSideways(tiny("vgg", 1), update="every 2 ticks")
    with pytest.raises(ValueError):
        ChunkedSideways(tiny("vgg", 1), chunk=0)
