"""The throughput models: busy patterns, tick sums, scaling, the deep stack, link fit, plot; the
chunked executor's macro ticks, its 1F1B event simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sideways_cli.engine.clock import stage_order
from sideways_cli.engine.registers import clip_tokens
from sideways_cli.engine.sideways_chunked import ChunkedSideways
from sideways_cli.models import build_model
from sideways_cli.parallel.balance import ModuleCosts
from sideways_perf.chunked_model import macro_work, predict_chunked, stage_ops, sweep_chunked
from sideways_perf.link import Link, measure_link
from sideways_perf.macro_costs import MacroCosts, interpolate
from sideways_perf.throughput_model import busy, clip_seconds, plot_model, predict, repeat_stack, sweep

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


@pytest.mark.parametrize("between_clips", ["reset", "continuous"])
def test_one_stage_pays_every_busy_module(between_clips: str):
    forward, backward = [1e-3, 2e-3, 3e-3, 4e-4], [5e-3, 6e-3, 7e-3, 8e-4]
    link = Link(1.0, 1.0)  # a very slow link, which one stage never uses
    prediction = predict(costs_of(forward, backward), 1, link, batch=8, clip_len=5,
                         between_clips=between_clips)
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


@pytest.mark.multiprocess
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


# --- the chunked executor's model: synthetic macro costs, no timing ---


def macro_costs(per_window: list[float], overhead: float = 0.0, loss: float = 0.0,
                step: list[float] | None = None, out: list[int] | None = None,
                into: list[int] | None = None) -> MacroCosts:
    """Every call of module d costs ``overhead + per_window[d] * n`` (quiet, busy and VJP alike),
    exactly (linear between and beyond the measured counts)."""
    depth, windows = len(per_window), [1, 2, 4, 8, 16]
    curve = [[overhead + c * n for n in windows] for c in per_window]
    return MacroCosts([f"m{d}" for d in range(depth)], windows, curve, [list(c) for c in curve],
                      [list(c) for c in curve], [loss * n for n in windows],
                      step or [0.0] * depth, out or [100] * depth, into or [100] * depth)


def test_interpolation_is_linear_between_and_beyond_the_measured_counts():
    windows, seconds = [1, 2, 4, 8], [1.0, 1.5, 2.0, 4.0]
    assert [interpolate(windows, seconds, n) for n in (0, 1, 2, 3, 4, 6, 8)] == [
        0.0, 1.0, 1.5, 1.75, 2.0, 3.0, 4.0]
    assert interpolate(windows, seconds, 16) == 8.0  # the last segment, 0.5 per window, on
    assert interpolate([2], [3.0], 4) == 6.0  # a single point: proportional
    costs = macro_costs([1.0, 2.0], overhead=0.5)
    assert costs.busy(1, 3) == costs.vjp(1, 3) == costs.quiet(1, 3) == 6.5
    assert costs.full_s(4) == [9.0, 17.0]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("between_clips", ["reset", "continuous"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 8])
def test_macro_work_replays_the_engine(between_clips: str, chunk: int):
    """Counts of quiet/busy windows and of VJP messages per module and macro tick, from an actual
    run of ChunkedSideways (the last of 3 batches: continuous reaches its steady state)."""
    torch.manual_seed(0)
    model = build_model("c3d", 10, width=2, depth=3)  # 4 modules
    rule = ChunkedSideways(model, between_clips, "clip", chunk)
    seen = []
    forward, vjp = rule.forward_module, rule.vjp
    rule.forward_module = lambda d, q, b: seen.append(("F", d, q, b)) or forward(d, q, b)
    rule.vjp = lambda d, graph, messages, count: (seen.append(("V", d, len(messages)))
                                                 or vjp(d, graph, messages, count))
    clips, labels = torch.randn(2, 3, 5, 8, 8), torch.tensor([1, 2])
    for _ in range(3):
        seen.clear()
        macros = rule.start_batch(clips.shape[2])
        rule.feed_inputs(clip_tokens(clips, [labels] * 5, rule.fed - 5))
        for macro in macros:
            graphs = rule.forward_macro(macro)
            rule.frame_losses()
            rule.backward_macro(macro, graphs)
        rule.pseudo.clear()
    expected = []
    for w in macro_work(4, 5, between_clips, chunk):
        expected += [("F", d, w.quiet[d], w.busy[d]) for d in range(4)]
        expected += [("V", d, max(w.busy[d], w.drain_graph[d])) for d in reversed(range(4))
                     if w.busy[d] or w.drain_graph[d]]
        assert w.sent_down[1:] == [max(b, g) for b, g in zip(w.busy[1:], w.drain_graph[1:])]
    assert seen == expected


@pytest.mark.parametrize("between_clips", ["reset", "continuous"])
def test_one_process_pays_the_sum_of_its_ops(between_clips: str):
    costs = macro_costs([1e-3, 2e-3, 3e-3], overhead=1e-4, loss=1e-5, step=[1e-4, 2e-4, 3e-4])
    slow = Link(1.0, 1.0)  # never used by one process
    prediction = predict_chunked(costs, 1, slow, batch=4, clip_len=12, chunk=4, between_clips=between_clips)
    work = macro_work(3, 12, between_clips, 4)
    ops = stage_ops(costs, range(3), work, last=True)
    assert prediction.sizes == [3] and prediction.macros == len(work) == len(ops) // 3
    assert prediction.clip_s == pytest.approx(math.fsum(ops.values()) + 6e-4, rel=1e-12)
    assert prediction.frames_per_s == pytest.approx(4 * 12 / prediction.clip_s, rel=1e-12)
    if between_clips == "continuous":  # every window busy: 3 macro ticks of 4 per module
        per_macro = sum(2 * (1e-4 + c * 4) for c in (1e-3, 2e-3, 3e-3)) + 4e-5
        assert prediction.clip_s == pytest.approx(3 * per_macro + 6e-4, rel=1e-12)
        assert prediction.ticks == 12
    else:
        assert prediction.ticks == 12 + 2


def test_two_balanced_stages_approach_twice_one_as_clips_grow():
    costs = macro_costs([1e-3, 1e-3])  # proportional to the windows: macro sizes do not matter
    speedups = []
    for clip_len in (8, 64, 512, 4096):
        one, two = (predict_chunked(costs, p, FREE, 1, clip_len, 8, "continuous").clip_s
                    for p in (1, 2))
        speedups.append(one / two)
    assert speedups == sorted(speedups) and speedups[-1] > 1.99
    # few macro ticks: T = 2 in two macro ticks of one tick; the bubble is the first forward and
    # the last backward crossing the stages alone: 6 ms instead of 4
    two = predict_chunked(costs, 2, FREE, 1, 2, 1, "continuous")
    assert two.macros == 2 and two.clip_s == pytest.approx(6e-3)
    assert predict_chunked(costs, 1, FREE, 1, 2, 1, "continuous").clip_s == pytest.approx(8e-3)
    timeline = [(op.stage, op.kind, op.macro, round(op.start * 1e3, 9), round(op.end * 1e3, 9))
                for op in two.ops if op.kind != "L"]
    assert sorted(timeline, key=lambda op: (op[0], op[3])) == [
        (0, "F", 0, 0, 1), (0, "F", 1, 1, 2), (0, "B", 0, 3, 4), (0, "B", 1, 5, 6),
        (1, "F", 0, 1, 2), (1, "B", 0, 2, 3), (1, "F", 1, 3, 4), (1, "B", 1, 4, 5)]


@pytest.mark.parametrize("between_clips", ["reset", "continuous"])
def test_no_op_starts_before_its_input_has_arrived(between_clips: str):
    costs = macro_costs([1e-3, 3e-3, 2e-3, 2e-3, 5e-4], overhead=2e-4, loss=1e-5,
                        out=[4000, 2000, 3000, 1000, 40], into=[6000, 4000, 2000, 3000, 1000])
    link = Link(1e-4, 1e7)
    prediction = predict_chunked(costs, 3, link, 2, 9, 2, between_clips, sizes=[1, 2, 2])
    work = macro_work(5, 9, between_clips, 2)
    ends = {(op.stage, op.kind, op.macro): op.end for op in prediction.ops}
    edges = [0, 1, 3, 5]
    for op in prediction.ops:
        if op.kind == "F" and op.stage > 0:
            g = edges[op.stage] - 1  # the module below the boundary
            count, nbytes = work[op.macro].arrivals[g], costs.output_bytes[g]
            source = (op.stage - 1, "F", op.macro)
        elif op.kind == "B" and op.stage < 2:
            g = edges[op.stage + 1]  # the module above it
            count, nbytes = work[op.macro].sent_down[g], costs.input_bytes[g]
            source = (op.stage + 1, "B", op.macro)
        else:
            continue
        if count:
            assert op.start >= op.ready >= ends[source] + link.hop_s(count * nbytes) - 1e-15
    for s in range(3):  # each stage one op at a time, in its order
        mine = [op for op in prediction.ops if op.stage == s]
        assert [(op.kind, op.macro) for op in mine] == stage_order(s, 3, len(work))
        assert all(a.end <= b.start for a, b in zip(mine, mine[1:]))
    assert prediction.clip_s == pytest.approx(max(ends.values()) + link.alpha)


def test_chunked_stages_sharing_cores_take_turns_and_the_sweep():
    costs = macro_costs([1e-3] * 4, step=[1e-4] * 4)
    alone = predict_chunked(costs, 4, FREE, 1, 64, 4, "continuous")
    shared = predict_chunked(costs, 4, FREE, 1, 64, 4, "continuous", cores=2)
    work = math.fsum(op.end - op.start for op in shared.ops) + 4e-4
    assert shared.clip_s == pytest.approx(max(alone.clip_s, work / 2))
    assert shared.clip_s > alone.clip_s
    slower = macro_costs([2e-3] * 4, step=[1e-4] * 4)
    curve = sweep_chunked(costs, FREE, 1, 64, 4, "continuous", concurrent_costs=slower)
    assert [p.stages for p in curve] == [1, 2, 3, 4] and curve[1].sizes == [2, 2]
    assert curve[0].clip_s == predict_chunked(costs, 1, FREE, 1, 64, 4, "continuous").clip_s
    assert curve[3].clip_s == predict_chunked(slower, 4, FREE, 1, 64, 4, "continuous").clip_s
    deep = repeat_stack(costs, 16)  # macro costs deepen like tick costs
    assert len(deep.names) == 16 and deep.busy_s[5] == costs.busy_s[1]
    assert len(sweep_chunked(deep, FREE, 1, 64, 4, max_stages=8)) == 8
