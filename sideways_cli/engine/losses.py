"""Per-frame losses: every frame of a clip has one, in BP and in Sideways alike (SIDEWAYS.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Logits that AMP left in bf16, in fp32 for the loss and softmax; fp32 and fp64 as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def frame_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of one frame's logits [B, K] against the clip labels [B], mean over the batch."""
    return F.cross_entropy(logits, labels)


def clip_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of the per-frame losses of whole clips: logits [B, K, T], labels [B]."""
    if logits.is_cuda:
        return flat_clip_loss(logits, labels)
    return F.cross_entropy(logits, labels[:, None].expand(-1, logits.shape[-1]))


def flat_clip_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """:func:`clip_loss` with the frames folded into the batch: the same mean, summed in another
    order. On CUDA the [B, K, T] form runs nll_loss2d, which has no deterministic kernel and stops
    a --deterministic run; on CPU the original form is kept, so its numbers do not move."""
    k, t = logits.shape[1], logits.shape[2]
    return F.cross_entropy(logits.transpose(1, 2).reshape(-1, k), labels.repeat_interleave(t))


def clip_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Clip prediction = mean of the per-frame softmax over the clip: [B, K, T] -> [B, K]."""
    return logits.softmax(dim=1).mean(dim=-1)
