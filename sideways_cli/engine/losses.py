"""Per-frame losses: every frame of a clip has one, in BP and in Sideways alike (docs/sideways.md).

An objective says what each frame's output is trained to match: the clip's label (``classify``,
the paper's action recognition) or the frame itself (``reconstruct``, its encoder-decoder task).
The rules only ever call ``frame_targets``, ``frame_loss`` and ``clip_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Logits that AMP left in bf16, in fp32 for the loss and softmax; fp32 and fp64 as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def frame_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of one frame's logits [B, K] against the clip labels, mean over the batch:
    class indices [B], or class probabilities [B, K] (MixUp's and CutMix's blends).
    ``label_smoothing``: that share of every target spread evenly over the classes."""
    return F.cross_entropy(logits, labels.to(logits.dtype) if labels.is_floating_point() else labels,
                           label_smoothing=label_smoothing)


def clip_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean of the per-frame losses of whole clips: logits [B, K, T], labels [B] or [B, K].

    The frames are folded into the batch, [B*T, K] against each frame's label: cross-entropy
    over [B, K, T] directly would run nll_loss2d, which has no deterministic CUDA kernel and stops
    a --deterministic run. One form on every device, so the CPU tests check what GPUs run.
    """
    k, t = logits.shape[1], logits.shape[2]
    return frame_loss(logits.transpose(1, 2).reshape(-1, k), labels.repeat_interleave(t, dim=0),
                      label_smoothing)


def clip_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Clip prediction = mean of the per-frame softmax over the clip: [B, K, T] -> [B, K]."""
    return logits.softmax(dim=1).mean(dim=-1)


@dataclass(frozen=True)
class Classify:
    """Every frame's logits [B, K] against its clip's label (an index, or class probabilities),
    ``label_smoothing`` of it spread over the classes."""

    label_smoothing: float = 0.0
    name = "classify"

    def frame_targets(self, clips: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        return [labels] * clips.shape[2]

    def frame_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return frame_loss(output, target, self.label_smoothing)

    def clip_loss(self, outputs: torch.Tensor, clips: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return clip_loss(outputs, labels, self.label_smoothing)


class Reconstruct:
    """Every frame's output [B, C, H, W] against the frame itself: mean squared error.

    A mean over the batch and pixels of one frame, so the mean of the per-frame losses of a clip
    is the MSE over the whole clip, as for classification.
    """

    name = "reconstruct"

    def frame_targets(self, clips: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        return list(clips.unbind(2))

    def frame_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, target)

    def clip_loss(self, outputs: torch.Tensor, clips: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs, clips)


Objective = Classify | Reconstruct
OBJECTIVES: dict[str, Objective] = {"classify": Classify(), "reconstruct": Reconstruct()}
CLASSIFY = OBJECTIVES["classify"]


def objective(task: str, label_smoothing: float = 0.0) -> Objective:
    """The objective of ``task`` (classify, reconstruct); ``label_smoothing``: classify's."""
    return Classify(label_smoothing) if task == "classify" else OBJECTIVES[task]
