"""Clip- and video-level accuracy of a frame-step network.

Both rules evaluate the same way: the causal network over each clip (the pipelined forward computes
the same function), run a time chunk at a time so that memory does not grow with the clip length;
clip prediction = mean of the per-frame softmax, video prediction = mean of its clips'
predictions. Mean class accuracy is the mean over classes of the video-level
recall, which weighs every class alike whatever its number of videos.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from rich.progress import Progress

from sideways_cli.config import Config
from sideways_cli.data.catalog import DatasetIndex
from sideways_cli.data.datasets import GuardedLoader
from sideways_cli.engine.losses import at_least_fp32, clip_probabilities
from sideways_cli.models.stack import CausalNetwork, causal_outputs
from sideways_cli.reports.progress import tracked
from sideways_cli.reports.tables import write_csv, write_json
from sideways_cli.run.reconstruction import Shards, evaluate_reconstruction
from sideways_cli.support.runtime import Autocast, forward_autocast, to_device

# what an evaluation is ranked by (best.pt) and reported with, per task
PRIMARY_METRIC = {"classify": "val_video_top1", "reconstruct": "val_psnr"}

def topk_correct(probs: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, probs.shape[1])
    return (probs.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


@dataclass
class VideoScores:
    """An evaluation of a split: its metrics, the video-level confusion matrix [true, predicted]
    and, per video that had a readable clip, its index in the split, label and probabilities."""

    metrics: dict[str, float]
    confusion: torch.Tensor
    videos: torch.Tensor  # [V] indices into the split
    labels: torch.Tensor  # [V]
    probabilities: torch.Tensor  # [V, classes]: the mean over the video's views


def batch_probabilities(model: CausalNetwork, clips: torch.Tensor, device: torch.device,
                        autocast: Autocast, chunk: int) -> torch.Tensor:
    """Each clip's class probabilities [B, K] on the CPU: the mean of its frames' softmax, the
    network run ``chunk`` frames at a time."""
    with autocast():  # logits [B, K, T] are small: only the activations are chunked
        logits = torch.cat([at_least_fp32(y) for y in causal_outputs(
            model, to_device(clips, device, model.dtype), chunk)], dim=2)
    return clip_probabilities(logits).float().cpu()


def evaluate(model: CausalNetwork, loader: Iterable[dict], num_videos: int, num_classes: int,
             device: torch.device, split: str = "val", autocast: Autocast = nullcontext,
             bar: Progress | None = None, *, chunk: int, shards: Shards | None = None) -> dict[str, float]:
    return evaluate_videos(model, loader, num_videos, num_classes, device, split, autocast,
                           bar, chunk=chunk, shards=shards).metrics


@torch.no_grad()
def evaluate_videos(model: CausalNetwork, loader: Iterable[dict], num_videos: int,
                    num_classes: int, device: torch.device, split: str = "val",
                    autocast: Autocast = nullcontext, bar: Progress | None = None,
                    *, chunk: int, shards: Shards | None = None) -> VideoScores:
    """Metrics named ``<split>_...``, the confusion matrix and every video's probabilities.
    The forward passes run in ``autocast`` (bf16 with AMP), ``chunk`` frames at a time; ``bar``
    gets a task for the batches. ``shards``: the loader holds this replica's share of the split,
    and the totals are summed over the replicas before any metric is taken."""
    was_training = model.training
    model.eval()
    hits = torch.zeros(3, dtype=torch.long)  # clips, top-1 hits, top-5 hits
    video_probs = torch.zeros(num_videos, num_classes)
    video_counts = torch.zeros(num_videos)
    video_labels = torch.full((num_videos,), -1, dtype=torch.long)
    for batch in tracked(loader, bar, f"eval {split}"):
        probs = batch_probabilities(model, batch["clip"], device, autocast, chunk)
        labels = batch["label"]
        hits += torch.tensor([len(labels), *(topk_correct(probs, labels, k).sum() for k in (1, 5))])
        video_probs.index_add_(0, batch["video"], probs)
        video_counts.index_add_(0, batch["video"], torch.ones(len(labels)))
        video_labels[batch["video"]] = labels
    model.train(was_training)
    if shards is not None:
        for total in (hits, video_probs, video_counts):
            shards.sum_(total, "summing the evaluation")
        shards.max_(video_labels, "summing the evaluation")  # -1 where a replica saw no clip
    clips = int(hits[0])
    seen = video_counts > 0
    vprobs, vlabels = video_probs[seen] / video_counts[seen, None], video_labels[seen]
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((vlabels, vprobs.argmax(dim=1)), torch.ones(len(vlabels), dtype=torch.long),
                         accumulate=True)
    per_class = confusion.diag() / confusion.sum(dim=1).clamp(min=1)
    present = confusion.sum(dim=1) > 0  # classes without videos in the split do not count
    metrics = {
        f"{split}_clip_top1": int(hits[1]) / max(clips, 1),
        f"{split}_clip_top5": int(hits[2]) / max(clips, 1),
        f"{split}_video_top1": topk_correct(vprobs, vlabels, 1).float().mean().item(),
        f"{split}_video_top5": topk_correct(vprobs, vlabels, 5).float().mean().item(),
        f"{split}_mean_class_acc": per_class[present].mean().item() if present.any() else 0.0,
        f"{split}_clips": clips,
        f"{split}_videos": int(seen.sum()),
    }
    return VideoScores(metrics, confusion, seen.nonzero().flatten(), vlabels, vprobs)


def write_video_scores(path: Path, scores: VideoScores, videos: Sequence[Path],
                       classes: Sequence[str]) -> None:
    """``sideways eval --dump``: ``scores`` of the split whose videos are ``videos`` (in the
    split's order), for ensembling models' predictions or reading the errors one by one. A
    ``.json`` file holds the class names and a record per video; any other name is a CSV, a row
    per video and a column per class. Written atomically."""
    rows = [(str(videos[int(v)]), classes[int(label)], classes[int(probs.argmax())], probs.tolist())
            for v, label, probs in zip(scores.videos, scores.labels, scores.probabilities)]
    if path.suffix == ".json":
        records = [{"video": video, "label": label, "predicted": predicted, "probabilities": probs}
                   for video, label, predicted, probs in rows]
        write_json(path, {"classes": list(classes), "videos": records})
    else:
        write_csv(path, ["video", "label", "predicted", *classes],
                  ([video, label, predicted, *(f"{p:.6g}" for p in probs)]
                   for video, label, predicted, probs in rows))


def evaluate_split(cfg: Config, model: CausalNetwork, loader: GuardedLoader, data: DatasetIndex,
                   device: torch.device, split: str = "val", autocast: Autocast | None = None,
                   bar: Progress | None = None, shards: Shards | None = None) -> dict[str, float]:
    """The task's metrics on ``split``: accuracies for classify, MSE and PSNR for reconstruct
    (``shards``: this replica's share of them, summed with the others')."""
    autocast = autocast or forward_autocast(device, cfg.amp)
    if cfg.task == "reconstruct":
        transform = loader.loader.dataset.transform
        return evaluate_reconstruction(model, loader, device, transform.mean, transform.std, split,
                                       autocast, bar, chunk=cfg.eval.chunk, shards=shards)
    return evaluate(model, loader, len(data.split(split)), len(data.classes), device, split,
                    autocast, bar, chunk=cfg.eval.chunk, shards=shards)


def evaluation_line(step: int, steps: int, val: dict[str, float], elapsed_s: float,
                    prefix: str = "") -> str:
    """The one line an evaluation prints: where, how good, how long the run has taken so far."""
    minutes, seconds = divmod(round(elapsed_s), 60)
    hours, minutes = divmod(minutes, 60)
    if "val_psnr" in val:
        headline = f"val PSNR {val['val_psnr']:.2f} dB, MSE {val['val_mse']:.4f}"
    else:
        headline = f"val clip top-1 {val['val_clip_top1']:.3f}, video top-1 {val['val_video_top1']:.3f}"
    return f"{prefix + ' ' if prefix else ''}step {step}/{steps}: {headline}, elapsed {hours}:{minutes:02d}:{seconds:02d}"
