"""The properties docs/sideways.md says the engine must satisfy, on every model of the zoo."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sideways_cli.engine.fidelity import gradient_fidelity
from sideways_cli.engine import BackpropRule, SidewaysRule
from sideways_cli.engine.losses import clip_loss, frame_loss
from sideways_cli.engine.probes import make_video, module_gradients
from sideways_cli.engine.registers import Registers, clip_tokens, tick_forward
from sideways_cli.models import ZOO, build_model
from tiny import random_clips, tiny_network

ZOO_NAMES = sorted(ZOO)


def tiny(name: str, k: int = 1, dtype=torch.float64, seed: int = 0):
    return tiny_network(name, k, dtype, seed)  # the whole network: every module of the zoo's


def random_clip(t: int, b: int = 2, size: int = 16, dtype=torch.float64, seed: int = 1):
    return random_clips(1, t, size, dtype, batch=b, seed=seed)[0]


def smooth_clip(t: int, stride: float = 1.0, b: int = 2, size: int = 16, dtype=torch.float64):
    """A smooth texture translating ``stride`` pixels per frame to the right (and half that down)."""
    g = torch.Generator().manual_seed(7)
    texture = F.avg_pool2d(torch.randn(b, 3, 4 * size, 4 * size, generator=g), 5, 1, 2)
    frames = []
    for i in range(t):
        shift = i * stride  # in output pixels; the texture is sampled one texel per pixel
        theta = torch.tensor([[0.25, 0, shift / (2 * size)], [0, 0.25, shift / (4 * size)]])
        grid = F.affine_grid(theta.expand(b, 2, 3), (b, 3, size, size), align_corners=False)
        frames.append(F.grid_sample(texture, grid, align_corners=False, padding_mode="reflection"))
    return torch.stack(frames, dim=2).to(dtype), torch.tensor([1, 3][:b])


# -- property 1: the pipelined forward is the causal network over the whole clip -----------------

@pytest.mark.parametrize("name", ZOO_NAMES)
@pytest.mark.parametrize("k", [1, 3])
def test_pipelined_forward_equals_whole_clip(name, k):
    model = tiny(name, k, dtype=torch.float32)
    clip, _ = random_clip(7, dtype=torch.float32)
    whole = model(clip)
    assert whole.shape == (2, 5, 7)
    torch.testing.assert_close(tick_forward(model, clip), whole, rtol=1e-5, atol=1e-6)


def test_causality_future_frames_do_not_change_past_outputs():
    model = tiny("c3d", 3)
    clip, _ = random_clip(6)
    changed = clip.clone()
    changed[:, :, 4:] = torch.randn_like(changed[:, :, 4:])
    torch.testing.assert_close(model(changed)[..., :4], model(clip)[..., :4])
    assert not torch.allclose(model(changed)[..., 4:], model(clip)[..., 4:])


# -- property 2: BP is exact --------------------------------------------------------------------

def bp_grads(model, clip, labels):
    model.zero_grad(set_to_none=True)
    BackpropRule(model).train_batch(clip, labels, apply_update=lambda: None)
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_bp_equals_autograd_through_the_unrolled_pipeline(name):
    """BP's whole-clip gradient equals differentiating the tick-by-tick computation itself."""
    model = tiny(name, 3)
    clip, labels = random_clip(5)
    expected = bp_grads(model, clip, labels)
    model.zero_grad(set_to_none=True)
    registers = Registers(model)
    tokens = clip_tokens(clip, labels)
    # differentiate through the registers: keep their values attached to the graph
    losses = []
    for tick in range(len(tokens) + len(model) - 1):
        frame = tokens[tick] if tick < len(tokens) else None
        for step in registers.forward_tick(frame, with_graph=True):
            step.token.value = step.output  # re-attach so the next module's window has a graph
            if step.index == len(model) - 1:
                losses.append(frame_loss(step.output, labels))
    torch.stack(losses).mean().backward()
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


def test_bp_matches_finite_differences():
    torch.manual_seed(0)
    model = build_model("vgg", 5, width=2, temporal_kernel=2).double()
    clip, labels = random_clip(3, b=2, size=8)
    grads = bp_grads(model, clip, labels)
    eps = 1e-6
    for p, g in list(zip(model.parameters(), grads))[::3]:
        for i in torch.randperm(p.numel(), generator=torch.Generator().manual_seed(0))[:3].tolist():
            flat = p.data.view(-1)
            orig = flat[i].item()
            flat[i] = orig + eps
            up = clip_loss(model(clip), labels).item()
            flat[i] = orig - eps
            down = clip_loss(model(clip), labels).item()
            flat[i] = orig
            assert math.isclose(g.view(-1)[i].item(), (up - down) / (2 * eps), rel_tol=1e-5, abs_tol=1e-8)


# -- property 3: on a static video Sideways is BP -----------------------------------------------

def per_module(model, rule_cls, clip, labels):
    rule = rule_cls(model) if rule_cls is BackpropRule else rule_cls(model, between_clips="reset", update="clip")
    return module_gradients(model, rule, clip, labels)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_static_video_sideways_equals_bp_for_per_frame_modules(name):
    model = tiny(name, 1)
    clip = make_video(random_clip(6)[0], "static")
    labels = torch.tensor([1, 3])
    bp = per_module(model, BackpropRule, clip, labels)
    sw = per_module(model, SidewaysRule, clip, labels)
    for d, (a, b) in enumerate(zip(bp, sw)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14, msg=f"module {d}")  # float64


@pytest.mark.slow  # a long clip: seconds
@pytest.mark.parametrize("name, options", [("vgg", {}), ("c3d", {"depth": 4})])
def test_static_video_with_temporal_windows_is_close_on_a_long_clip(name, options):
    # the mismatch is confined to the 2(D-1) fill/drain ticks, so it vanishes as T grows
    torch.manual_seed(0)
    model = build_model(name, 5, width=4, temporal_kernel=3, **options).double()
    clip, labels = make_video(random_clip(96)[0], "static"), torch.tensor([1, 3])
    bp = per_module(model, BackpropRule, clip, labels)
    sw = per_module(model, SidewaysRule, clip, labels)
    assert min(F.cosine_similarity(a, b, dim=0) for a, b in zip(bp, sw)) > 0.99


# -- property 4: the top module's gradient is exact on any video -------------------------------

@pytest.mark.parametrize("name", ZOO_NAMES)
@pytest.mark.parametrize("k", [1, 3])
def test_top_module_is_exact_on_any_video(name, k):
    model = tiny(name, k)
    assert model.windows[-1] == 1
    clip, labels = random_clip(6)
    bp = per_module(model, BackpropRule, clip, labels)
    sw = per_module(model, SidewaysRule, clip, labels)
    torch.testing.assert_close(sw[-1], bp[-1], rtol=1e-10, atol=1e-12)
    # and lower modules really are approximations on a random video
    assert F.cosine_similarity(sw[0], bp[0], dim=0) < 0.999


# -- property 5: fidelity falls as frames grow less alike ---------------------------------------

@pytest.mark.slow
def test_fidelity_falls_with_frame_distance():
    # In reset mode module 1 pairs a gradient with an activation 2(D-1) frames newer; shuffling
    # pairs frames about T/3 apart, so it only hurts more than natural order when T >> 6(D-1).
    model = tiny("vgg", 1)
    natural, labels = smooth_clip(64, stride=0.1)
    clips = {"static": make_video(natural, "static"), "natural": natural,
             "stride8": smooth_clip(64, stride=0.8)[0], "shuffled": make_video(natural, "shuffled")}
    rows = {kind: gradient_fidelity(model, clip, labels) for kind, clip in clips.items()}
    bottom = {kind: r[0]["cosine"] for kind, r in rows.items()}
    assert bottom["static"] > 0.9999
    assert bottom["static"] > bottom["natural"] > bottom["stride8"]
    assert bottom["natural"] > bottom["shuffled"]
    # per tick: a message at the window it meets vs the window its frame produced
    for d in range(len(model) - 1):
        tick = {kind: r[d]["tick_cosine"] for kind, r in rows.items()}
        assert tick["static"] > 0.9999, d
        assert tick["natural"] > tick["stride8"] and tick["natural"] > tick["shuffled"], (d, tick)
    assert all(r[-1]["tick_cosine"] == pytest.approx(1.0) for r in rows.values())  # the top is exact

