"""The streaming claim: a video arrives one frame per tick and a learner trains as it goes.

Sideways takes every frame: each tick a frame enters the pipeline, every module does its forward
and backward step, and the weights are updated every ``update_every`` ticks. Blocking BP cannot
overlap: once it takes a frame it needs D ticks to carry it up the network and D more to carry the
gradient down before it can update and take the next, so the 2D - 1 frames that arrive meanwhile
are dropped, and its temporal windows see frames 2D apart. Both learners start from the same
weights with the same optimizer; both are scored by the PSNR of their final weights over every
frame of the stream they learned from and, when there is one, of a held-out stream.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sideways_cli.config import Config
from sideways_cli.data.decode import open_video
from sideways_cli.data.render import SYNTHETIC_CLASSES, render_video
from sideways_cli.data.transforms import ClipTransform
from sideways_cli.engine.losses import OBJECTIVES
from sideways_cli.engine.clock import Schedule
from sideways_cli.engine.sideways import SidewaysRule
from sideways_cli.models import FrameStack
from sideways_cli.models.stack import causal_outputs
from sideways_cli.run.build import DTYPES, make_optimizer
from sideways_cli.run.reconstruction import frame_psnr
from sideways_cli.support.runtime import clock, to_device

RECONSTRUCT = OBJECTIVES["reconstruct"]
Tick = Callable[[int], None]  # told how many ticks (arrived frames) a learner got through


@dataclass
class StreamResult:
    mode: str
    frames_arrived: int
    frames_used: int  # frames the learner trained on
    updates: int
    psnr: float  # dB, final weights, mean over every frame of the stream
    held_out_psnr: float | None  # the same on a stream it never saw
    wall_s: float


def synthetic_stream(frames: int, size: int, segment: int, seed: int) -> torch.Tensor:
    """uint8 [T, H, W, 3]: synthetic videos of ``segment`` frames, one class after another, cut
    together like the shots of a real video."""
    rng = np.random.default_rng(seed)
    parts, total = [], 0
    while total < frames:
        clip = render_video(len(parts) % len(SYNTHETIC_CLASSES), rng, segment, size)
        parts.append(clip)
        total += len(clip)
    return torch.from_numpy(np.concatenate(parts)[:frames])


def video_stream(path: Path, frames: int, backend: str) -> torch.Tensor:
    """uint8 [T, H, W, 3]: the first ``frames`` frames of a video file (all if it is shorter)."""
    with closing(open_video(path, backend)) as decoder:
        return decoder.get(list(range(min(frames, decoder.num_frames))))


def prepare(frames: torch.Tensor, size: int) -> tuple[torch.Tensor, ClipTransform]:
    """uint8 frames -> a normalised [1, 3, T, size, size] stream (centre crop) and its transform."""
    transform = ClipTransform(size=size, resize=size)
    return transform.normalise(transform.spatial(frames, None)).unsqueeze(0), transform


@torch.no_grad()
def stream_psnr(model: FrameStack, stream: torch.Tensor, transform: ClipTransform,
                chunk: int) -> float:
    """Mean PSNR over every frame: the causal network over the whole stream (what the pipeline
    computes tick by tick), ``chunk`` frames at a time so that a long stream fits in memory, on
    the model's device."""
    model.eval()
    stream = to_device(stream, model.device, model.dtype)
    psnr = torch.cat([frame_psnr(y, frames, transform.mean, transform.std)
                      for frames, y in zip(stream.split(chunk, dim=2), causal_outputs(model, stream, chunk))],
                     dim=1)
    model.train()
    return psnr.mean().item()


def learn_sideways(cfg: Config, model: FrameStack, stream: torch.Tensor, update_every: int,
                   on_ticks: Tick = lambda n: None) -> tuple[int, int]:
    """Every frame enters the pipeline at its tick (pairing messages as ``sideways.stash``
    says); returns (frames used, updates)."""
    rule = SidewaysRule(model, between_clips="continuous", update=f"every {update_every} ticks",
                        objective=RECONSTRUCT, schedule=Schedule.of(model, cfg.sideways.stash))
    optimizer = make_optimizer(cfg.train, model)

    def apply_update() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    no_label = torch.zeros(1, dtype=torch.long, device=stream.device)
    updates = 0
    for t in range(stream.shape[2]):  # one tick per frame: a one-frame clip continues the stream
        updates += rule.train_batch(stream[:, :, t:t + 1], no_label, apply_update).updates
        on_ticks(1)
    return stream.shape[2], updates


def learn_blocking_bp(cfg: Config, model: FrameStack, stream: torch.Tensor,
                      on_ticks: Tick = lambda n: None) -> tuple[int, int]:
    """Take a frame, spend 2D ticks on its forward and backward, update, take the next frame to
    arrive; returns (frames used, updates). The causal windows see the frames that were taken."""
    optimizer = make_optimizer(cfg.train, model)
    busy_ticks = 2 * len(model)
    context = 1 + sum(k - 1 for k in model.windows)  # frames one output depends on
    taken_at = range(0, stream.shape[2], busy_ticks)
    taken: list[torch.Tensor] = []
    for t in taken_at:
        taken = (taken + [stream[:, :, t]])[-context:]
        loss = RECONSTRUCT.frame_loss(model(torch.stack(taken, dim=2))[:, :, -1], stream[:, :, t])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        on_ticks(min(busy_ticks, stream.shape[2] - t))
    return len(taken_at), len(taken_at)


def run_stream(cfg: Config, model_factory, frames: torch.Tensor, update_every: int, device: torch.device,
               held_out: torch.Tensor | None = None,
               progress: Callable[[str], Tick] = lambda mode: lambda n: None) -> list[StreamResult]:
    """Both learners on the same stream from the same initial weights (``model_factory()``);
    ``progress(mode)`` gives the callback that learner reports its ticks to."""
    stream, transform = prepare(frames, cfg.data.size)
    dtype = DTYPES[cfg.precision]
    stream = to_device(stream, device, dtype)
    unseen = to_device(prepare(held_out, cfg.data.size)[0], device, dtype) if held_out is not None else None
    results = []
    for mode in ("bp", "sideways"):
        model = model_factory().to(device)
        started = clock(device)
        if mode == "bp":
            used, updates = learn_blocking_bp(cfg, model, stream, progress(mode))
        else:
            used, updates = learn_sideways(cfg, model, stream, update_every, progress(mode))
        wall = clock(device) - started
        results.append(StreamResult(
            mode, stream.shape[2], used, updates, stream_psnr(model, stream, transform, cfg.eval.chunk),
            stream_psnr(model, unseen, transform, cfg.eval.chunk) if unseen is not None else None, wall))
    return results


def as_dicts(results: list[StreamResult]) -> list[dict]:
    return [asdict(r) for r in results]
