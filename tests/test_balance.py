"""Stage balancing: the exact partition, the config's balance checks, per-module tick and
macro-tick costs."""

from __future__ import annotations

import functools
import itertools
import math
import random

import pytest
import torch

from sideways_cli.models import build_model
from sideways_cli.parallel.balance import (measure_module_costs, module_shapes, partition,
                                           resolve_balance, stage_costs)
from sideways_cli.support.errors import UserError
from sideways_perf.macro_costs import measure_macro_costs


def brute_force(costs: list[float], stages: int) -> list[int]:
    """Every contiguous split; the least bottleneck, ties to the lexicographically largest sizes."""
    n = len(costs)
    splits = []
    for cuts in itertools.combinations(range(1, n), stages - 1):
        edges = [0, *cuts, n]
        sizes = [b - a for a, b in zip(edges, edges[1:])]
        splits.append((max(math.fsum(costs[a:b]) for a, b in zip(edges, edges[1:])), sizes))
    best = min(bottleneck for bottleneck, _ in splits)
    return max(sizes for bottleneck, sizes in splits if bottleneck == best)


@pytest.mark.parametrize("kind", ["integers", "floats"])
def test_partition_is_the_brute_force_optimum(kind: str):
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 9)
        # small integers make many ties, which the tie rule must break like the brute force
        costs = [float(rng.randint(0, 4)) if kind == "integers" else rng.uniform(0.1, 3.0)
                 for _ in range(n)]
        stages = rng.randint(1, n)
        sizes = partition(costs, stages)
        assert sizes == brute_force(costs, stages), (costs, stages)
        assert len(sizes) == stages and sum(sizes) == n and min(sizes) >= 1


def test_partition_examples_and_errors():
    assert partition([1.0, 1.0, 1.0, 1.0], 3) == [2, 1, 1]  # ties: lower stages take more
    assert partition([5.0, 5.0, 5.0, 5.0, 0.01], 2) == [2, 3]
    assert partition([3.0, 1.0, 1.0, 1.0, 1.0, 3.0], 2) == [3, 3]
    assert stage_costs([3.0, 1.0, 1.0, 1.0, 1.0, 3.0], [2, 4]) == [4.0, 6.0]
    with pytest.raises(ValueError, match="3 modules into 4 stages"):
        partition([1.0, 2.0, 3.0], 4)


def test_resolve_balance():
    names = ["conv1", "conv2", "conv3a", "conv3b", "head"]
    assert resolve_balance([2, 3], 2, 5) == [2, 3]
    assert resolve_balance("auto", 2, 5, costs=[4.0, 1.0, 1.0, 1.0, 1.0]) == [1, 4]
    with pytest.raises(UserError, match=r"parallel\.stages=6 but the model has only 5 modules "
                                        r"\(conv1, conv2, conv3a, conv3b, head\)"):
        resolve_balance("auto", 6, 5, costs=[1.0] * 5, names=names)
    with pytest.raises(UserError, match=r"parallel\.balance=\[2, 2\] .* model's 5 modules "
                                        r"\(conv1, .*head\), got 2 summing to 4"):
        resolve_balance([2, 2], 2, 5, names=names)
    with pytest.raises(ValueError, match="one cost per module"):
        resolve_balance("auto", 2, 5)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("k", [3, 1])  # 3: the conv path of the chunked executor; 1: window gradients
def test_measure_module_costs_on_a_tiny_model(k: int):
    torch.manual_seed(0)
    model = build_model("c3d", 10, width=4, depth=2, temporal_kernel=k)
    shapes = module_shapes(model, (2, 3, 16, 16))
    assert [(list(i), list(o)) for i, o in shapes] == [
        ([2, 3, 16, 16], [2, 4, 8, 8]), ([2, 4, 8, 8], [2, 8, 4, 4]), ([2, 8, 4, 4], [2, 10])]
    costs = measure_module_costs(model, (2, 3, 16, 16), repeats=2)
    assert costs.names == ["conv1", "conv2", "head"]
    assert len(costs.forward_s) == len(costs.backward_s) == 3
    assert all(s > 0 for s in costs.forward_s + costs.backward_s)
    assert costs.total_s == [f + b for f, b in zip(costs.forward_s, costs.backward_s)]
    assert costs.output_bytes == [math.prod(o) * 4 for _, o in shapes] == [2048, 1024, 80]
    assert costs.input_bytes == [math.prod(i) * 4 for i, _ in shapes] == [6144, 2048, 1024]
    assert all(p.grad is None for p in model.parameters())  # timing leaves the model untouched


@pytest.mark.usefixtures("one_thread")
def test_bytes_follow_the_autocast_dtype():
    torch.manual_seed(0)
    model = build_model("c3d", 10, width=4, depth=2)
    bf16 = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    costs = measure_module_costs(model, (2, 3, 16, 16), repeats=1, autocast=bf16)
    # bf16 activations go up, and the messages of bf16 windows come down in bf16
    assert costs.output_bytes == [1024, 512, 40]
    assert costs.input_bytes == [6144, 1024, 512]  # the first module's input: fp32 frames


@pytest.mark.usefixtures("one_thread")
# 2: another process measures meanwhile
@pytest.mark.parametrize("concurrent", [1, pytest.param(2, marks=pytest.mark.multiprocess)])
def test_measure_macro_costs_on_a_tiny_model(concurrent: int):
    torch.manual_seed(0)
    model = build_model("c3d", 10, width=4, depth=2)
    before = [p.detach().clone() for p in model.parameters()]
    costs = measure_macro_costs(model, (2, 3, 16, 16), windows=(1, 2, 4), repeats=1,
                                concurrent=concurrent)
    assert costs.names == ["conv1", "conv2", "head"] and costs.windows == [1, 2, 4]
    assert costs.concurrent == concurrent
    for curve in costs.quiet_s + costs.busy_s + costs.vjp_s + [costs.loss_s, costs.step_s]:
        assert len(curve) == 3 and all(s > 0 for s in curve)
    assert costs.busy(1, 3) == pytest.approx((costs.busy_s[1][1] + costs.busy_s[1][2]) / 2)
    assert costs.output_bytes == [2048, 1024, 80]  # as measure_module_costs
    assert costs.input_bytes == [6144, 2048, 1024]
    # timing leaves the model as it was
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
