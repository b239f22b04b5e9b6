"""The throughput model: busy patterns, tick sums, scaling, the deep stack, link fit, plot."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sideways_cli.distributed.balance import ModuleCosts
from sideways_cli.distributed.throughput_model import (Link, busy, clip_seconds, measure_link,
                                                       plot_model, predict, repeat_stack, sweep)

FREE = Link(0.0, math.inf)  # communication costs nothing


def costs_of(forward: list[float], backward: list[float], out: list[int] | None = None,
             into: list[int] | None = None) -> ModuleCosts:
    depth = len(forward)
    return ModuleCosts([f"m{d}" for d in range(depth)], forward, backward,
                       out or [100] * depth, into or [100] * depth)


def test_busy_patterns_and_tick_counts():
    forward, backward = busy(3, 4, "reset")
    assert forward.shape == backward.shape == (4 + 2 * 2, 3)
    assert [list(np.flatnonzero(forward[:, d])) for d in range(3)] == [
        [0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5]]
    assert [list(np.flatnonzero(backward[:, d])) for d in range(3)] == [
        [4, 5, 6, 7], [3, 4, 5, 6], [2, 3, 4, 5]]
    forward, backward = busy(3, 4, "continuous")
    assert forward.shape == (4, 3) and forward.all() and backward.all()
    costs = costs_of([1.0] * 3, [1.0] * 3)
    assert predict(costs, 2, FREE, 1, 4, "reset").ticks == 8
    assert predict(costs, 2, FREE, 1, 4, "continuous").ticks == 4


@pytest.mark.parametrize("pipeline", ["reset", "continuous"])
def test_one_stage_pays_every_busy_module(pipeline: str):
    forward, backward = [1e-3, 2e-3, 3e-3, 4e-4], [5e-3, 6e-3, 7e-3, 8e-4]
    link = Link(1.0, 1.0)  # a very slow link, which one stage never uses
    prediction = predict(costs_of(forward, backward), 1, link, batch=8, clip_len=5,
                         pipeline=pipeline)
    # each module computes T forwards and T VJPs per clip, whatever the mode
    expected = 5 * (sum(forward) + sum(backward))
    assert prediction.sizes == [4]
    assert prediction.clip_s == pytest.approx(expected, rel=1e-12)
    assert prediction.frames_per_s == pytest.approx(8 * 5 / expected, rel=1e-12)


def test_balanced_continuous_scales_exactly_and_reset_pays_fill_and_drain():
    costs = costs_of([0.25] * 8, [0.75] * 8)
    one = predict(costs, 1, FREE, 4, 16, "continuous").frames_per_s
    for p in (2, 4, 8):
        assert predict(costs, p, FREE, 4, 16, "continuous").frames_per_s == p * one
    # reset, D = 2, T = 1: the two modules are never busy at the same tick, two stages gain nothing
    pair = costs_of([1.0, 1.0], [1.0, 1.0])
    assert clip_seconds(pair, [2], FREE, 1, "reset") == clip_seconds(pair, [1, 1], FREE, 1, "reset")
    assert clip_seconds(pair, [1, 1], FREE, 1, "reset") == (4.0, 3)


def test_communication_adds_one_hop_of_the_busiest_boundary_per_tick():
    costs = costs_of([1e-3, 1e-3, 1e-3], [1e-3, 2e-3, 1e-3], out=[1000, 500, 10],
                     into=[10, 3000, 200])
    link = Link(1e-3, 1e6)  # 1 ms + 1 ms per 1000 bytes
    # boundary 0|1: 1000 up + 3000 down, boundary 1|2: 500 up + 200 down; the busiest: 5 ms
    seconds, ticks = clip_seconds(costs, [1, 1, 1], link, 5, "continuous")
    assert ticks == 5 and seconds == pytest.approx(5 * (3e-3 + 5e-3))
    # reset, D = 2, T = 1: tick 0 sends the activation up (1000 B), tick 1 the message down
    # (3000 B), tick 2 (module 0's VJP) sends nothing
    pair = costs_of([1e-3, 1e-3], [1e-3, 2e-3], out=[1000, 10], into=[10, 3000])
    seconds, ticks = clip_seconds(pair, [1, 1], link, 1, "reset")
    assert ticks == 3 and seconds == pytest.approx((1e-3 + 2e-3) + (3e-3 + 4e-3) + 1e-3)


def test_stages_sharing_cores_take_turns():
    costs = costs_of([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 3.0])  # totals 2, 2, 2, 4
    # 4 stages on 2 cores: a tick lasts max(slowest stage 4, all work 10 / 2 cores) = 5
    assert clip_seconds(costs, [1, 1, 1, 1], FREE, 3, "continuous", cores=2) == (15.0, 3)
    assert clip_seconds(costs, [1, 1, 1, 1], FREE, 3, "continuous", cores=4) == (12.0, 3)
    assert predict(costs, 2, FREE, 1, 3, "continuous", cores=2).clip_s == 18.0  # [3, 1]: 6, 4


def test_the_deep_stack_sweeps_to_64_stages():
    real = costs_of([0.5, 1.0, 1.0, 0.2], [0.5, 1.0, 1.0, 0.3])  # totals 1, 2, 2, 0.5
    assert [p.stages for p in sweep(real, FREE, 4, 16)] == [1, 2, 3, 4]  # D = 4 stops at 4
    deep = repeat_stack(real, 64)
    assert len(deep.names) == 64 and deep.names[1] == "m2.0" and deep.names[-1] == "m3"
    assert deep.total_s == [1.0] + [2.0] * 62 + [0.5]
    curve = sweep(deep, FREE, 4, 16, "continuous")
    assert [p.stages for p in curve] == list(range(1, 65))
    assert curve[0].frames_per_s == pytest.approx(4 / 125.5)
    assert curve[-2].frames_per_s == pytest.approx(4 / 2.5)  # 63 stages: one pair, middle + head
    assert curve[-1].frames_per_s == pytest.approx(4 / 2.0)  # one module each
    assert curve[-1].sizes == [1] * 64


def test_measure_link_fits_a_positive_latency_and_bandwidth():
    link = measure_link(sizes=(4, 1 << 16, 1 << 20), repeats=5)
    assert len(link.points) == 15 and {b for b, _ in link.points} == {4, 1 << 16, 1 << 20}
    assert 0 < link.alpha < 0.05 and 1e6 < link.beta < 1e12
    assert link.hop_s(1 << 20) == pytest.approx(link.alpha + (1 << 20) / link.beta)


def test_plot_model_writes_a_png(tmp_path):
    costs = costs_of([1.0] * 4, [1.0] * 4)
    curves = {mode: sweep(costs, FREE, 2, 8, mode) for mode in ("reset", "continuous")}
    path = tmp_path / "model.png"
    plot_model(path, curves, {"continuous": [(1, 0.1), (2, 0.19)]})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["model.png"]
