"""bf16 autocast (--amp): both rules and evaluation run on CPU, the weights stay fp32, and AMP is
refused where it cannot run."""

from __future__ import annotations

import pytest
import torch

from sideways_cli.engine import make_rule
from sideways_cli.models import FrameStack
from sideways_cli.run import evaluate as evaluation
from sideways_cli.run.evaluate import evaluate
from sideways_cli.support.errors import UserError
from sideways_cli.support.runtime import forward_autocast
from tiny import random_clips, tiny_network

CPU = torch.device("cpu")
# (model, temporal kernel, mode, chunk): every executor and both conv paths; then the bf16-vs-fp32
# difference of the first batch's loss (absolute) and of its gradient (relative, of the norm),
# at about 3x the largest measured on CPU (bf16 keeps 8 significant bits: 2^-8 = 0.4%)
RULES = {
    "bp": ("c3d", 3, "bp", 1, 5e-4, 0.15),  # measured 1.4e-4, 0.051
    "sideways tick rule": ("vgg", 1, "sideways", 1, 2e-4, 0.08),  # 5.8e-5, 0.024
    "sideways chunked, 3D convs": ("c3d", 3, "sideways", 4, 2e-3, 0.35),  # 6.1e-4, 0.125
    "sideways chunked, residual blocks": ("resnet18", 3, "sideways", 4, 3e-3, 0.06),  # 1e-3, 0.019
}
# bf16 logits of the tiny c3d against fp32: 4.8e-3 at most, where the logits reach 0.75. fp16
# would give 5e-4, no autocast 0 (or ~1e-7 from another order of the sums).
LOGITS_ATOL = 0.015
BF16_AT_LEAST = 1e-3


def tiny(name: str, k: int) -> FrameStack:
    return tiny_network(name, k, torch.float32, depth=2)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return random_clips(1, 6, size=16)[0]


def train(case: str, amp: bool, batches: int) -> tuple[FrameStack, float, torch.Tensor]:
    """The model after ``batches`` AMP (or fp32) batches of ``case``'s rule, the first batch's loss
    and its gradient (flattened), from the same initial weights."""
    name, k, mode, chunk, *_ = RULES[case]
    model = tiny(name, k)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    rule = make_rule(mode, model, chunk=chunk, autocast=forward_autocast(CPU, amp))
    gradients = []

    def apply_update() -> None:
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    clips, labels = batch()
    losses = [rule.train_batch(clips, labels, apply_update).loss for _ in range(batches)]
    assert all(torch.isfinite(torch.tensor(losses)))
    return model, losses[0], gradients[0]


@pytest.mark.parametrize("case", list(RULES))
def test_amp_trains_every_rule_on_cpu_close_to_fp32(case):
    *_, loss_atol, gradient_rtol = RULES[case]
    before = [p.detach().clone() for p in tiny(*RULES[case][:2]).parameters()]
    model, loss, gradient = train(case, amp=True, batches=2)
    _, fp32_loss, fp32_gradient = train(case, amp=False, batches=1)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # the same batch from the same weights: bf16's rounding, no more (autocast on the loss would
    # round it to bf16, ~4e-3 at 2) and no less (autocast off: 0)
    assert 1e-6 < abs(loss - fp32_loss) <= loss_atol, (loss, fp32_loss)
    difference = ((gradient - fp32_gradient).norm() / fp32_gradient.norm()).item()
    assert 1e-4 < difference <= gradient_rtol


def test_evaluation_under_amp_is_close_to_fp32(monkeypatch):
    model = tiny("c3d", 3)
    clips, labels = batch()
    with torch.no_grad():
        fp32 = model(clips)
        with forward_autocast(CPU, True)():
            logits = model(clips)
    assert logits.dtype == torch.bfloat16
    difference = (logits.float() - fp32).abs().max().item()
    assert BF16_AT_LEAST < difference <= LOGITS_ATOL
    # evaluate runs its forwards in the autocast it is given: the logits it scores are the bf16
    # ones, not fp32's (chunk 3 or 16: the same outputs)
    scored = []

    def clip_probabilities(logits: torch.Tensor, probabilities=evaluation.clip_probabilities):
        scored.append(logits)
        return probabilities(logits)

    monkeypatch.setattr(evaluation, "clip_probabilities", clip_probabilities)
    loader = [{"clip": clips, "label": labels, "video": torch.tensor([0, 1])}]
    full = evaluate(model, loader, 2, 5, CPU, chunk=16)
    half = evaluate(model, loader, 2, 5, CPU, autocast=forward_autocast(CPU, True), chunk=3)
    full_logits, half_logits = scored
    torch.testing.assert_close(full_logits, fp32, rtol=1e-6, atol=1e-6)
    difference = (half_logits - full_logits).abs().max().item()
    assert BF16_AT_LEAST < difference <= LOGITS_ATOL
    # top classes 0.02 apart in probability, AMP moves them by 5e-4: the same predictions
    assert half == full and full["val_clips"] == 2


def test_amp_is_refused_on_a_gpu_that_only_emulates_bf16(monkeypatch):
    """A V100 or T4 runs bf16 in emulation, slower than fp32: refused, naming the GPU and the fix."""
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return including_emulation  # what such a GPU answers

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    with pytest.raises(UserError, match="needs native bf16, which Tesla T4 lacks .*; drop --amp, "
                                        "or train on an Ampere or later GPU"):
        forward_autocast(torch.device("cuda"), True)
    forward_autocast(torch.device("cuda"), False)  # without --amp nothing is asked of the GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    forward_autocast(torch.device("cuda"), True)  # native bf16 (Ampere and later): accepted
