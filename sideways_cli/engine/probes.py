"""Measuring the rules without training: each module's gradient from given weights and a batch,
and the videos the engine's properties are stated on (docs/sideways.md: static, shuffled)."""

from __future__ import annotations

import torch

from sideways_cli.models import FrameStack

VIDEO_KINDS = ("natural", "static", "shuffled")


def make_video(clips: torch.Tensor, kind: str, seed: int = 0) -> torch.Tensor:
    """natural: as decoded; static: the first frame repeated; shuffled: frames in random order."""
    if kind == "static":
        return clips[:, :, :1].expand_as(clips).contiguous()
    if kind == "shuffled":
        order = torch.randperm(clips.shape[2], generator=torch.Generator().manual_seed(seed))
        return clips[:, :, order]
    if kind != "natural":
        raise ValueError(f"video must be one of {VIDEO_KINDS}, got {kind!r}")
    return clips


def module_gradients(model: FrameStack, rule, clips: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """One flat gradient vector per module, computed by ``rule`` without changing the weights."""
    model.zero_grad(set_to_none=True)
    rule.train_batch(clips, labels, apply_update=lambda: None)
    flat = []
    for module in model.stack:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]
        flat.append(torch.cat([g.flatten() for g in grads]) if grads else clips.new_zeros(0))
    model.zero_grad(set_to_none=True)
    return flat
