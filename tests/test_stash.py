"""The staleness dial (sideways.stash): ``full`` gives BP's weights step after step, in float64,
for every zoo network, with temporal windows and without, a torchvision adapter, the tick rule
and the chunked executor (2 and 3 stages: test_depth_parallel.py); the schedule's extra ticks are
the ones stated; every module still works on every tick; and in between, the dial moves the
pseudo-gradient towards BP's."""

from __future__ import annotations

import functools

import pytest
import torch

from optimizer_helpers import STEPS, stepper
from sideways_cli.engine import BackpropRule, ChunkedSideways, Schedule, SidewaysRule, make_rule
from sideways_cli.engine.fidelity import gradient_fidelity
from sideways_cli.engine.losses import OBJECTIVES
from sideways_cli.models import FrameStack
from sideways_cli.parallel.resharding import (merge_replica_states, replica_share, stage_rule_share,
                                              stage_rules_merger)
from sideways_cli.parallel.stages import stage_ranges
from sideways_cli.reports.tables import mean_below_head
from tiny import random_clips, tiny_network

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

NETWORKS = ["c3d", "resnet18", "vgg", "autoencoder"]
EXECUTORS = {  # name -> the rule with stash: full
    "tick rule": lambda m, objective: SidewaysRule(m, objective=objective,
                                                   schedule=Schedule.of(m, "full")),
    "chunk 4": lambda m, objective: ChunkedSideways(m, chunk=4, objective=objective,
                                                    schedule=Schedule.of(m, "full")),
}


def task(name: str) -> str:
    return "reconstruct" if name == "autoencoder" else "classify"


def network(name: str, k: int) -> FrameStack:
    # c3d at depth 3 (D = 4) and the autoencoder at 2 levels keep the float64 passes small
    options = {"c3d": {"depth": 3}, "autoencoder": {"levels": 2}}.get(name, {})
    return tiny_network(name, k, **options)


def train(model: FrameStack, rule, optimizer: str, frames: int = 7,
          steps: int = STEPS) -> list[torch.Tensor]:
    """Every parameter after each batch, flattened into one vector per step."""
    apply_update, schedule_step = stepper(optimizer, model)
    after = []
    for clips, labels in random_clips(steps, frames, dtype=torch.float64):
        rule.train_batch(clips, labels, apply_update)
        schedule_step()
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    return after


@functools.cache
def backprop(name: str, k: int, optimizer: str) -> tuple[torch.Tensor, ...]:
    model = network(name, k)
    return tuple(train(model, BackpropRule(model, OBJECTIVES[task(name)]), optimizer))


def assert_same_weights(actual: list[torch.Tensor], expected: tuple[torch.Tensor, ...]) -> None:
    for step, (got, want) in enumerate(zip(actual, expected, strict=True)):
        assert not torch.equal(want, expected[0]) or step == 0  # BP did train
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"step {step}: {m}")


# every network, k and executor with SGD-Nesterov; AdamW, whose state a wrong gradient would carry
# differently, through the chunked executor (the executors' equality: test_sideways_chunked.py).
# make test-fast keeps one network with temporal windows through both executors.
EQUALITY = [pytest.param(name, k, optimizer, executor, id=f"{name}-k{k}-{optimizer}-{executor}",
                         marks=[] if (name, k, optimizer) == ("c3d", 3, "sgd-nesterov") else [pytest.mark.slow])
            for name in NETWORKS for k in (1, 3) for optimizer in ("sgd-nesterov", "adamw")
            for executor in EXECUTORS if optimizer == "sgd-nesterov" or executor == "chunk 4"]


@pytest.mark.parametrize("name, k, optimizer, executor", EQUALITY)
def test_stash_full_trains_the_weights_bp_trains(name, k, optimizer, executor):
    model = network(name, k)
    rule = EXECUTORS[executor](model, OBJECTIVES[task(name)])
    assert_same_weights(train(model, rule, optimizer), backprop(name, k, optimizer))


@pytest.mark.slow  # seconds of float64 steps
def test_stash_full_trains_a_torchvision_network_as_bp():
    """torchvision's MobileNetV3 adapted to frame steps: 14 modules (a drain of T + 26 ticks),
    inverted residual blocks, squeeze-excitation, GroupNorm."""
    from sideways_cli.run.build import build_network, resolve_config

    cfg = resolve_config(None, ["model.name=torchvision:mobilenet_v3_small", "model.norm=group",
                                "model.args.dropout=0.0", "precision=float64"])

    def fresh() -> FrameStack:
        torch.manual_seed(0)
        return build_network(cfg, 5)

    bp_model, sw_model = fresh(), fresh()
    assert len(bp_model) == 14
    expected = tuple(train(bp_model, BackpropRule(bp_model), "adamw", frames=4, steps=3))
    actual = train(sw_model, make_rule("sideways", sw_model, chunk=4, stash="full"), "adamw",
                   frames=4, steps=3)
    assert_same_weights(actual, expected)


def test_a_stash_as_deep_as_every_message_is_old_pairs_exactly_without_routing():
    """Per-frame modules (k = 1) have nothing to route: a stash of 2(D-1) frames is ``full``;
    one frame less leaves the bottom module's pairing stale, and so its gradient."""
    model = network("vgg", 1)
    depth = 2 * (len(model) - 1)
    clips, labels = random_clips(1, depth + 4, dtype=torch.float64)[0]  # longer than the fill

    def gradients(stash) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        make_rule("sideways", model, stash=stash).train_batch(clips, labels, lambda: None)
        return [p.grad.clone() for p in model.parameters()]

    full = gradients("full")
    torch.testing.assert_close(gradients(depth), full, rtol=1e-12, atol=0)
    short = gradients(depth - 1)
    assert not torch.allclose(short[0], full[0], rtol=1e-6)  # the bottom module's first weight
    torch.testing.assert_close(short[-1], full[-1], rtol=1e-12, atol=0)  # the head's is exact


def test_the_schedule_states_the_longer_drain():
    """Routing delays a frame's message at module g by the windows above it: a reset batch takes
    T + (D-1) + sum of k_g over the modules above the first, against Sideways' T + 2(D-1)."""
    model = network("c3d", 3)
    windows = model.windows  # [3, 3, 3, 1]
    sideways, full = Schedule.of(model), Schedule.of(model, "full")
    assert sideways.batch_ticks(7, "reset") == 7 + 2 * 3
    assert full.batch_ticks(7, "reset") == 7 + 3 + sum(windows[1:])
    assert full.batch_ticks(7, "reset") - sideways.batch_ticks(7, "reset") == sum(k - 1 for k in windows[1:])
    assert full.batch_ticks(7, "continuous") == 7
    assert [full.stash_depth(g) for g in range(4)] == [10, 6, 2, 0]  # c_g - g
    assert [Schedule.of(model, 2).stash_depth(g) for g in range(4)] == [2, 2, 2, 0]


@pytest.mark.parametrize("stash", [0, 2, "full"])
def test_every_module_does_one_forward_and_one_vjp_a_tick(stash):
    """Depth parallelism is kept: module g's backward ticks are one run of T ticks, its forward
    ticks another, every tick at most one of each; the batch takes Schedule.batch_ticks."""
    model = network("c3d", 3)
    rule = SidewaysRule(model, schedule=Schedule.of(model, stash))
    backward_ticks: list[list[int]] = [[] for _ in model.stack]
    step = rule.backward_module

    def counted(d: int, message: torch.Tensor):
        backward_ticks[d].append(rule.clock)
        return step(d, message)

    rule.backward_module = counted
    clips, labels = random_clips(1, 7, dtype=torch.float64)[0]
    rule.train_batch(clips, labels, lambda: None)
    assert rule.clock == rule.schedule.batch_ticks(7, "reset")
    for g, ticks in enumerate(backward_ticks):
        assert ticks == list(rule.schedule.message_ticks(g, 7))


def test_the_stash_keeps_as_many_inputs_whatever_the_clip_length():
    """Kept inputs are dropped once no message can meet them: between ticks module g keeps
    stash_depth(g) + k - 1 inputs, however long the clip (memory flat in T,
    benchmarks/memory_vs_clip_length.py)."""
    model = network("c3d", 3)
    schedule = Schedule.of(model, "full")
    kept = []
    for frames in (16, 48):
        rule = SidewaysRule(model, schedule=schedule)
        most = [0] * len(model)
        kept.append(most)
        tick = rule.tick

        def watched(frame, message=None, rule=rule, tick=tick, most=most):
            loss = tick(frame, message)
            for d, register in enumerate(rule.registers.windows):
                most[d] = max(most[d], len(register.slots))
            return loss

        rule.tick = watched
        clips, labels = random_clips(1, frames, dtype=torch.float64)[0]
        rule.train_batch(clips, labels, lambda: None)
    assert kept[0] == kept[1] == [schedule.stash_depth(g) + k - 1 for g, k in enumerate(model.windows)]


@pytest.mark.parametrize("video", ["smooth", "strided"])
def test_the_dial_moves_the_pseudo_gradient_towards_bps(video):
    """Along the dial (0, 2, 4, 8, full) the mismatch it closes shrinks: the mean over the modules
    below the head of the cosine between what a message gives at the window it meets and at its
    own frame's does not fall, on smooth video and on the same video taken every 3rd frame; at
    ``full`` both it and the whole batch's cosine with BP are 1 for every module. (The whole
    batch's cosine of one module of a random network need not rise at every step of the dial:
    it sums messages over the clip.)"""
    torch.manual_seed(0)
    # a smooth image drifting one pixel per frame
    image = torch.nn.functional.interpolate(torch.randn(2, 3, 8, 10, dtype=torch.float64),
                                            size=(64, 80), mode="bicubic", align_corners=False)
    drifting = torch.stack([image[..., t:t + 16, t:t + 16] for t in range(48)], dim=2)
    clips = drifting[:, :, ::3] if video == "strided" else drifting[:, :, :16]
    model = network("vgg", 1)
    dial = (0, 2, 4, 8, "full")
    rows = {stash: gradient_fidelity(model, clips, torch.tensor([1, 3]), stash=stash) for stash in dial}
    means = [mean_below_head(rows[stash], "tick_cosine") for stash in dial]
    assert means == sorted(means), means
    assert means[0] < 0.5  # a gap to close: the video moves
    for row in rows["full"]:
        assert row["cosine"] == pytest.approx(1, abs=1e-12)
        assert row["tick_cosine"] == pytest.approx(1, abs=1e-12)
    assert mean_below_head(rows["full"]) > mean_below_head(rows[0])


def assert_same_state(actual, expected, where: str = "state") -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_same_state(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_state(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


@pytest.mark.parametrize("chunk", [1, 3])
def test_the_stash_state_splits_into_stages_and_replicas_and_joins_back(chunk):
    """A checkpoint's registers move between a one-process run and R x P processes: the kept
    inputs and the routed messages on their way down go with their modules, and the routed
    messages are scaled as every gradient message is between replicas."""
    batches = random_clips(2, 7, dtype=torch.float64)

    def trained(clips_of=slice(None)) -> dict:
        rule = make_rule("sideways", network("c3d", 3), "continuous", chunk=chunk, stash="full")
        for clips, labels in batches:
            rule.train_batch(clips[clips_of], labels[clips_of], lambda: None)
        return rule.state_dict()

    state = trained()
    assert any(state["routed"])  # messages of frames still waiting for a window
    shares = [stage_rule_share(state, "sideways", "clip", chunk, modules, stage, 2)
              for stage, modules in enumerate(stage_ranges([2, 2]))]
    assert [len(share["rule"]["routed"]) for share in shares] == [2, 2]
    # replica 0's share is what a replica given the batches' first clips holds
    alone = trained(slice(0, 1))["routed"]
    for mine, own in zip(replica_share(state, 0, 2)["routed"], alone, strict=True):
        assert mine.keys() == own.keys()
        for frame in own:
            torch.testing.assert_close(mine[frame], own[frame], rtol=1e-12, atol=1e-15)
    joined = [merge_replica_states([replica_share(share, r, 2) for r in range(2)]) for share in shares]
    assert_same_state(stage_rules_merger("sideways", "clip", chunk)(joined), state)
