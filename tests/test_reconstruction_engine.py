"""The engine's properties hold for the encoder-decoder and the reconstruction objective too."""

from __future__ import annotations

import pytest
import torch

from sideways_cli.engine import BackpropRule, SidewaysRule
from sideways_cli.engine.losses import OBJECTIVES
from sideways_cli.engine.probes import make_video, module_gradients
from sideways_cli.engine.registers import tick_forward
from sideways_cli.engine.sideways_chunked import ChunkedSideways
from tiny import random_clips, tiny_network

RECONSTRUCT = OBJECTIVES["reconstruct"]


def tiny(k: int = 3, depth: int = 2):
    return tiny_network("autoencoder", k, levels=depth)


def clip(t: int, seed: int = 1) -> torch.Tensor:
    return random_clips(1, t, dtype=torch.float64, seed=seed)[0][0]


NO_LABELS = torch.zeros(2, dtype=torch.long)


def test_output_has_the_input_shape_and_pipelining_computes_the_same_function():
    model = tiny()
    x = clip(6)
    assert model(x).shape == x.shape
    torch.testing.assert_close(tick_forward(model, x), model(x), rtol=1e-10, atol=1e-12)


def test_bp_loss_is_the_mse_of_the_clip_and_its_gradient_is_autograd():
    model = tiny()
    x = clip(5)
    stats = BackpropRule(model, RECONSTRUCT).train_batch(x, NO_LABELS, apply_update=lambda: None)
    expected = torch.nn.functional.mse_loss(model(x), x)
    assert stats.loss == pytest.approx(expected.item(), rel=1e-12)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected.backward()
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(g, p.grad)


def test_static_video_sideways_equals_bp_for_per_frame_modules():
    model = tiny(k=1)
    x = make_video(clip(6), "static")
    bp = module_gradients(model, BackpropRule(model, RECONSTRUCT), x, NO_LABELS)
    sw = module_gradients(model, SidewaysRule(model, objective=RECONSTRUCT), x, NO_LABELS)
    for d, (a, b) in enumerate(zip(bp, sw)):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12, msg=f"module {d}")


def test_top_module_is_exact_on_any_video():
    model = tiny(k=3)
    x = clip(7)
    bp = module_gradients(model, BackpropRule(model, RECONSTRUCT), x, NO_LABELS)
    sw = module_gradients(model, SidewaysRule(model, objective=RECONSTRUCT), x, NO_LABELS)
    torch.testing.assert_close(sw[-1], bp[-1], rtol=1e-8, atol=1e-12)
    assert torch.nn.functional.cosine_similarity(sw[0], bp[0], dim=0) < 0.999


@pytest.mark.parametrize("between_clips, batches", [("reset", 1), ("continuous", 3)])
@pytest.mark.parametrize("chunk", [2, 5])
def test_batched_executor_gives_the_tick_rules_numbers(between_clips, batches, chunk):
    def run(rule_class, **options):
        model = tiny(k=3)
        rule = rule_class(model, between_clips=between_clips, objective=RECONSTRUCT, **options)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses, grads = [], []

        def apply_update():
            grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for b in range(batches):
            losses.append(rule.train_batch(clip(7, seed=b), NO_LABELS, apply_update).loss)
        return losses, grads

    losses, grads = run(ChunkedSideways, chunk=chunk)
    want_losses, want_grads = run(SidewaysRule)
    assert losses == pytest.approx(want_losses, rel=1e-10)
    for update, want in zip(grads, want_grads, strict=True):
        for g, w in zip(update, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12 * w.abs().max().item())
