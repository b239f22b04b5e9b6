"""bf16 autocast (--amp): both rules and evaluation run on CPU, the weights stay fp32, and AMP is
refused where it cannot run."""

from __future__ import annotations

import pytest
import torch

from sideways_cli.engine import make_rule
from sideways_cli.models import FrameStack
from sideways_cli.run.evaluate import evaluate
from sideways_cli.support.errors import UserError
from sideways_cli.support.runtime import forward_autocast
from tiny import random_clips, tiny_network

CPU = torch.device("cpu")
RULES = {  # (model, temporal kernel, mode, chunk): every executor and both conv paths
    "bp": ("c3d", 3, "bp", 1),
    "sideways tick rule": ("vgg", 1, "sideways", 1),
    "sideways chunked, 3D convs": ("c3d", 3, "sideways", 4),
    "sideways chunked, residual blocks": ("resnet18", 3, "sideways", 4),
}


def tiny(name: str, k: int) -> FrameStack:
    return tiny_network(name, k, torch.float32, depth=2)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return random_clips(1, 6, size=16)[0]


@pytest.mark.parametrize("case", list(RULES))
def test_amp_trains_every_rule_on_cpu(case):
    name, k, mode, chunk = RULES[case]
    model = tiny(name, k)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    rule = make_rule(mode, model, chunk=chunk, autocast=forward_autocast(CPU, True))

    def apply_update() -> None:
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    clips, labels = batch()
    losses = [rule.train_batch(clips, labels, apply_update).loss for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_evaluation_under_amp_is_close_to_fp32():
    model = tiny("c3d", 3)
    clips, labels = batch()
    loader = [{"clip": clips, "label": labels, "video": torch.tensor([0, 1])}]
    full = evaluate(model, loader, 2, 5, CPU, chunk=16)
    half = evaluate(model, loader, 2, 5, CPU, autocast=forward_autocast(CPU, True), chunk=3)
    assert full.keys() == half.keys() and 0.0 <= half["val_clip_top1"] <= 1.0
    with forward_autocast(CPU, True)():
        logits = model(clips)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), model(clips), atol=0.1, rtol=0.1)


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
