"""Clip- and video-level accuracy of a frame-step network.

Both rules evaluate the same way: the causal network over each clip at once (the pipelined forward
computes the same function), clip prediction = mean of the per-frame softmax, video prediction =
mean of its clips' predictions.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from sideways_cli.engine.losses import clip_probabilities
from sideways_cli.models import FrameStack


def topk_correct(probs: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, probs.shape[1])
    return (probs.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


@torch.no_grad()
def evaluate(model: FrameStack, loader: DataLoader, num_videos: int, num_classes: int,
             device: torch.device) -> dict[str, float]:
    was_training = model.training
    model.eval()
    clip_hits = {1: 0, 5: 0}
    clips = 0
    video_probs = torch.zeros(num_videos, num_classes)
    video_counts = torch.zeros(num_videos)
    video_labels = torch.full((num_videos,), -1, dtype=torch.long)
    for batch in loader:
        probs = clip_probabilities(model(batch["clip"].to(device))).float().cpu()
        labels = batch["label"]
        for k in clip_hits:
            clip_hits[k] += int(topk_correct(probs, labels, k).sum())
        clips += len(labels)
        video_probs.index_add_(0, batch["video"], probs)
        video_counts.index_add_(0, batch["video"], torch.ones(len(labels)))
        video_labels[batch["video"]] = labels
    model.train(was_training)
    seen = video_counts > 0
    vprobs, vlabels = video_probs[seen] / video_counts[seen, None], video_labels[seen]
    return {
        "val_clip_top1": clip_hits[1] / max(clips, 1),
        "val_clip_top5": clip_hits[5] / max(clips, 1),
        "val_video_top1": topk_correct(vprobs, vlabels, 1).float().mean().item(),
        "val_video_top5": topk_correct(vprobs, vlabels, 5).float().mean().item(),
        "val_clips": clips,
        "val_videos": int(seen.sum()),
    }
