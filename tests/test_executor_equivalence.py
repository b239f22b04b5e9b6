"""Every Sideways executor gives the tick rule's numbers over several optimizer steps, with every
optimizer the config offers: state that survives a step (momentum, Adam's moments, the schedule,
a continuous pipeline's registers) is where a difference would show.

Float64, so that what is compared is the computation. In float32 the executors agree to round-off
at each step, but the trajectories part after a few steps, as any two float32 runs that differ in
one rounding do (a 1-ulp change of the initial weights does the same to one executor): max-pool and
ReLU route the gradient by comparisons that round-off can flip (``benchmarks/executor_agreement.py``).
"""

from __future__ import annotations

import functools

import pytest
import torch

from optimizer_helpers import OPTIMIZERS, STEPS, stepper
from sideways_cli.engine.sideways import SidewaysRule
from sideways_cli.engine.sideways_chunked import ChunkedSideways
from sideways_cli.models import FrameStack
from tiny import random_clips, tiny_network

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

T = 20  # reset: T + D - 1 = 23 ticks, which no chunk below divides
CHUNKS = [4, 8, 16, 100]  # 8: the default; 100: more than a batch's ticks


def network() -> FrameStack:
    return tiny_network("c3d", depth=3)  # D = 4


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return random_clips(STEPS, T, dtype=torch.float64)


Trajectory = list[tuple[float, list[torch.Tensor]]]  # per batch: loss, weights after it


def trajectory(make_rule, optimizer: str) -> Trajectory:
    model = network()
    rule = make_rule(model)
    apply_update, schedule_step = stepper(optimizer, model)
    out: Trajectory = []
    for clips, labels in batches():
        stats = rule.train_batch(clips, labels, apply_update)
        schedule_step()
        out.append((stats.loss, [p.detach().clone() for p in model.parameters()]))
    return out


@functools.cache
def tick_rule(optimizer: str, between_clips: str) -> Trajectory:
    return trajectory(lambda m: SidewaysRule(m, between_clips=between_clips), optimizer)


def assert_same_trajectory(actual: Trajectory, expected: Trajectory) -> None:
    assert len(actual) == len(expected) == STEPS
    for step, ((loss, weights), (want_loss, want_weights)) in enumerate(zip(actual, expected), 1):
        assert loss == pytest.approx(want_loss, rel=1e-12), f"loss of step {step}"
        for w, want in zip(weights, want_weights):
            torch.testing.assert_close(w, want, rtol=1e-11, atol=1e-13, msg=f"after step {step}")


@pytest.mark.parametrize("between_clips", ["reset", "continuous"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("chunk", CHUNKS)
def test_the_chunked_executor_follows_the_tick_rule_step_after_step(chunk, optimizer, between_clips):
    actual = trajectory(lambda m: ChunkedSideways(m, between_clips=between_clips, chunk=chunk), optimizer)
    assert_same_trajectory(actual, tick_rule(optimizer, between_clips))


def test_the_trajectories_really_move():
    """Guards the comparisons above: the weights change at every step and the optimizers differ."""
    runs = {name: tick_rule(name, "continuous") for name in OPTIMIZERS}
    for run in runs.values():
        for (_, before), (_, after) in zip(run, run[1:]):
            assert not torch.equal(before[0], after[0])
    assert not torch.allclose(runs["sgd"][-1][1][0], runs["sgd-nesterov"][-1][1][0])
