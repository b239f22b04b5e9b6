"""The optimizer loop's knobs, at the one place where both rules step (``StageLearner.apply_update``):
gradient accumulation equal to the big batch, clipping by the global norm as torch clips, the
EMA of the weights, no weight decay on biases and norms, label smoothing and soft targets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sideways_cli.config import load_config
from sideways_cli.engine.losses import clip_loss, frame_loss, objective
from sideways_cli.parallel.resharding import merge_optimizers, optimizer_for_stage
from sideways_cli.parallel.topology import single
from sideways_cli.run.build import build_network, make_optimizer, parameter_groups
from sideways_cli.run.ema import WeightEma
from sideways_cli.run.learner import StageLearner
from sideways_cli.support.errors import UserError
from tiny import random_clips

BASE = ["device=cpu", "precision=float64", "model.name=c3d", "model.width=4", "model.depth=2",
        "model.temporal_kernel=3", "data.size=16", "data.clip_len=4", "train.warmup_steps=1",
        "train.steps=3", "sideways.chunk=2"]


def learner(sets: list[str]) -> StageLearner:
    cfg = load_config(None, [*BASE, *sets])
    return StageLearner(cfg, single(cfg), build_network(cfg, 10))


def weights(learner: StageLearner) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner.stack.parameters()]


def train_steps(learner: StageLearner, steps: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
    """Each step's clips through the learner, train.accumulate batches of them, as the training
    loop cuts them; the weights after each step."""
    accumulate = learner.cfg.train.accumulate
    after = []
    for clips, labels in steps:
        for i, (c, y) in enumerate(zip(clips.chunk(accumulate), labels.chunk(accumulate))):
            learner.train_batch(c, y, batch_in_step=i)
        after.append(weights(learner))
    return after


@pytest.mark.parametrize("mode", ["bp", "sideways"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_accumulating_batches_is_one_batch_of_them_all(mode, optimizer):
    """train.accumulate N over batches of B clips steps as one batch of N x B clips would, step
    after step, with every optimizer and with clipping on: the gradients averaged, then clipped."""
    steps = random_clips(3, frames=4, size=16, dtype=torch.float64, batch=6)
    common = [f"mode={mode}", f"train.optimizer={optimizer}", "train.lr=0.05",
              "train.clip_grad_norm=0.5", "train.label_smoothing=0.1"]
    big = train_steps(learner([*common, "data.batch_size=6"]), steps)
    accumulated = learner([*common, "data.batch_size=2", "train.accumulate=3"])
    before = weights(accumulated)
    small = train_steps(accumulated, steps)
    for step_big, step_small in zip(big, small):
        for a, b in zip(step_big, step_small):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert any(not torch.equal(a, b) for a, b in zip(before, small[-1]))  # it trained
    assert accumulated.grad_norm is not None and accumulated.grad_norm > 0.5  # clipping acted


def test_accumulation_steps_once_per_step_and_keeps_nothing_between():
    """The optimizer steps once for the N batches, and no .grad is left after a step."""
    trained = learner(["mode=sideways", "data.batch_size=2", "train.accumulate=2"])
    steps = []
    trained.optimizer.register_step_pre_hook(lambda *args: steps.append(1))
    train_steps(trained, random_clips(2, frames=4, size=16, dtype=torch.float64, batch=4))
    assert len(steps) == 2
    assert all(p.grad is None for p in trained.stack.parameters())


def test_clipping_is_torchs_clip_grad_norm():
    """The learner's clip gives the gradients clip_grad_norm_ gives, and logs the norm before it."""
    trained = learner(["mode=bp", "data.batch_size=2", "train.clip_grad_norm=0.01",
                       "train.optimizer=sgd", "train.momentum=0", "train.weight_decay=0"])
    clips, labels = random_clips(1, frames=4, size=16, dtype=torch.float64)[0]
    reference = [p.detach().clone().requires_grad_(True) for p in trained.stack.parameters()]
    before = weights(trained)
    trained.train_batch(clips, labels)
    # the same gradients, clipped by torch: a copy of the network at the weights the step started from
    twin = learner(["mode=bp", "data.batch_size=2"])
    with torch.no_grad():
        for p, w in zip(twin.stack.parameters(), reference):
            p.copy_(w)
    twin.executor.train_batch(clips, labels, lambda: None)
    norm = torch.nn.utils.clip_grad_norm_(twin.stack.parameters(), 0.01)
    assert trained.grad_norm.item() == pytest.approx(norm.item(), rel=1e-12)
    lr = trained.trained_lr
    for p, w, b in zip(twin.stack.parameters(), weights(trained), before):
        torch.testing.assert_close(w, b - lr * p.grad, rtol=1e-10, atol=1e-14)


def test_the_ema_follows_every_step_and_swaps_in_for_evaluation():
    trained = learner(["mode=sideways", "data.batch_size=2", "train.ema_decay=0.5"])
    start = trained.ema.state_dict()
    expected = {k: v.clone() for k, v in start.items()}
    for clips, labels in random_clips(3, frames=4, size=16, dtype=torch.float64):
        trained.train_batch(clips, labels)
        for key, value in trained.stack.state_dict().items():
            if value.is_floating_point():
                expected[key] = 0.5 * expected[key] + 0.5 * value
    for key, value in trained.ema.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-12, atol=1e-15)
    raw = weights(trained)
    seen = trained.evaluated(lambda network: {"val_x": float(next(network.parameters()).detach().sum())})
    key = next(iter(trained.stack.state_dict()))
    assert seen["val_ema_x"] == pytest.approx(float(expected[key].sum()))
    assert seen["val_x"] == pytest.approx(float(raw[0].sum()))
    assert all(torch.equal(a, b) for a, b in zip(raw, weights(trained)))  # the raw weights are back


def test_weight_ema_copies_integer_buffers():
    bn = torch.nn.BatchNorm1d(3)
    ema = WeightEma(bn, 0.9)
    bn.train()(torch.randn(4, 3))
    ema.update(bn)
    assert ema.state_dict()["num_batches_tracked"] == 1
    torch.testing.assert_close(ema.state_dict()["running_mean"], 0.1 * bn.running_mean)


def test_no_decay_on_biases_and_norms():
    cfg = load_config(None, [*BASE, "train.decay_norms_and_biases=false", "train.weight_decay=0.1"])
    network = build_network(cfg, 10)
    decayed, undecayed = parameter_groups(cfg.train, network)
    assert decayed and undecayed and all(p.ndim > 1 for p in decayed)
    assert all(p.ndim == 1 for p in undecayed)
    assert len(decayed) + len(undecayed) == len(list(network.parameters()))
    optimizer = make_optimizer(cfg.train, network)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    # a bias under AdamW with a zero gradient: decay alone would move it
    bias = undecayed[0]
    before = bias.detach().clone()
    for p in network.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.equal(bias, before)
    assert not torch.equal(decayed[0], decayed[0].detach() / (1 - 0.1 * cfg.train.lr))  # moved


def test_optimizer_groups_split_across_stages_and_join_again():
    """Two param groups reshard: the network's state cut into each stage's, and joined back."""
    cfg = load_config(None, [*BASE, "train.decay_norms_and_biases=false"])
    network = build_network(cfg, 10)
    optimizer = make_optimizer(cfg.train, network)
    for p in network.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    whole = optimizer.state_dict()
    stages = [range(0, 1), range(1, len(network))]
    parts = [torch.nn.ModuleList(network.stack[s.start:s.stop]) for s in stages]
    counts = [[len(g) for g in parameter_groups(cfg.train, part)] for part in parts]
    shares = [optimizer_for_stage(whole, counts, s) for s in range(len(stages))]
    for share, part in zip(shares, parts):  # each share loads into the stage's own optimizer
        make_optimizer(cfg.train, part).load_state_dict(share)
    joined = merge_optimizers(shares)
    assert joined["param_groups"] == whole["param_groups"]
    assert joined["state"].keys() == whole["state"].keys()
    for i, state in whole["state"].items():
        assert all(torch.equal(state[k], joined["state"][i][k]) for k in state)


def test_soft_targets_and_label_smoothing_are_cross_entropys():
    logits = torch.randn(4, 5, 3, dtype=torch.float64)
    labels = torch.tensor([0, 2, 4, 1])
    one_hot = F.one_hot(labels, 5).double()
    # class probabilities that are one class are that class's index
    torch.testing.assert_close(clip_loss(logits, one_hot), clip_loss(logits, labels))
    smoothed = 0.9 * one_hot + 0.1 / 5
    torch.testing.assert_close(clip_loss(logits, labels, 0.1), clip_loss(logits, smoothed))
    frame = logits[..., 0]
    torch.testing.assert_close(objective("classify", 0.1).frame_loss(frame, labels),
                               frame_loss(frame, smoothed))
    mixed = 0.3 * one_hot + 0.7 * one_hot.roll(1, 0)
    expected = -(mixed * frame.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(frame_loss(frame, mixed), expected)


@pytest.mark.parametrize("sets, says", [
    (["mode=sideways", "sideways.update=every 2 ticks", "train.accumulate=2"],
     "'train.accumulate' \\(2\\) averages whole batches"),
    (["mode=sideways", "sideways.update=every 2 ticks", "train.clip_grad_norm=1",
      "parallel.stages=2"], "'train.clip_grad_norm' across parallel.stages needs sideways.update=clip"),
    (["train.monitor=val_psnr"], "'train.monitor' must be auto or one of val_clip_top1"),
    (["train.monitor=val_ema_video_top1"], "val_ema_\\* with train.ema_decay"),
])
def test_the_loop_refuses_what_cannot_hold(sets, says):
    from sideways_cli.run.build import resolve_config

    with pytest.raises(UserError, match=says):
        resolve_config(None, sets)


def test_the_ema_monitor_is_accepted_with_an_ema():
    from sideways_cli.run.build import resolve_config
    from sideways_cli.run.evaluations import monitored

    cfg = resolve_config(None, ["train.ema_decay=0.99", "train.monitor=val_ema_video_top1"])
    assert monitored(cfg) == "val_ema_video_top1"
    assert not math.isnan(cfg.train.ema_decay)
