"""How well frames are reconstructed: mean squared error and PSNR in pixel space.

The network regresses normalised frames; PSNR is taken after undoing the normalisation, on [0, 1]
pixels with the prediction clipped to that range, per frame, and averaged over frames (the usual
video PSNR): 10 log10(1 / MSE).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable, Protocol, Sequence

import torch
from rich.progress import Progress

from sideways_cli.engine.losses import at_least_fp32
from sideways_cli.models.stack import CausalNetwork, causal_outputs
from sideways_cli.reports.progress import tracked
from sideways_cli.support.runtime import Autocast, to_device


class Shards(Protocol):
    """How the totals of this process's share of a split become the whole split's, when replicas
    evaluate a share each (``distributed.replicas.ReplicaGroup``)."""

    def sum_(self, tensor: torch.Tensor, doing: str) -> torch.Tensor: ...

    def max_(self, tensor: torch.Tensor, doing: str) -> torch.Tensor: ...


# a frame reconstructed exactly has infinite PSNR; cap it so means stay finite
_MIN_MSE = 1e-10


def to_pixels(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised [B, 3, T, H, W] (channels at dim 1) -> [0, 1] pixels."""
    shape = (1, len(mean)) + (1,) * (x.dim() - 2)
    def column(values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=x.dtype, device=x.device).view(shape)

    return x * column(std) + column(mean)


def frame_psnr(output: torch.Tensor, target: torch.Tensor, mean: Sequence[float],
               std: Sequence[float]) -> torch.Tensor:
    """PSNR (dB) of every frame of normalised [B, C, T, H, W] clips: [B, T]."""
    predicted = to_pixels(at_least_fp32(output), mean, std).clamp(0, 1)
    error = (predicted - to_pixels(at_least_fp32(target), mean, std)).square().mean(dim=(1, 3, 4))
    return -10 * torch.log10(error.clamp(min=_MIN_MSE))


@torch.no_grad()
def evaluate_reconstruction(model: CausalNetwork, loader: Iterable[dict], device: torch.device,
                            mean: Sequence[float], std: Sequence[float], split: str = "val",
                            autocast: Autocast = nullcontext, bar: Progress | None = None,
                            *, chunk: int, shards: Shards | None = None) -> dict[str, float]:
    """``<split>_mse`` (normalised units, the training loss) and ``<split>_psnr`` (dB, mean over
    frames) of every clip the loader yields; forward passes in ``autocast``, ``chunk`` frames at a
    time (the outputs are frames too, so each chunk's are scored and dropped), a task on ``bar``;
    ``shards``: the loader holds this replica's share, the totals are summed over the replicas."""
    was_training = model.training
    model.eval()
    # summed on the device in float64 (as Python floats were) and read once, at the end: reading
    # a GPU value waits for every kernel queued before it
    squared = psnr_sum = torch.zeros((), dtype=torch.float64, device=device)
    elements, frames, clips = 0, 0, 0
    for batch in tracked(loader, bar, f"eval {split}"):
        x = to_device(batch["clip"], device, model.dtype)
        with autocast():
            outputs = causal_outputs(model, x, chunk)
            for target, y in zip(x.split(chunk, dim=2), outputs):
                y = at_least_fp32(y)
                squared = squared + (y - target).square().sum().double()
                psnr = frame_psnr(y, target, mean, std)
                psnr_sum, frames = psnr_sum + psnr.sum().double(), frames + psnr.numel()
        elements += x.numel()
        clips += len(x)
    model.train(was_training)
    squared, psnr_sum = torch.stack([squared, psnr_sum]).tolist()
    if shards is not None:
        totals = torch.tensor([squared, elements, psnr_sum, frames, clips], dtype=torch.float64)
        shards.sum_(totals, "summing the evaluation")
        squared, elements, psnr_sum, frames, clips = totals.tolist()
        clips = int(clips)
    return {f"{split}_mse": squared / max(elements, 1), f"{split}_psnr": psnr_sum / max(frames, 1),
            f"{split}_clips": clips}
