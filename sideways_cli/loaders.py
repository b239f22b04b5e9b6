"""A run's data loaders, as its config describes them: training clips in the order that follows
from (seed, epoch, position), evaluation clips evenly spaced, each split guarded against videos
that do not decode; for a CUDA device, batches in pinned memory (see :func:`pin_memory_for`)."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from sideways_cli.config import Config
from sideways_cli.data.catalog import DatasetIndex
from sideways_cli.data.datasets import ClipDataset, GuardedLoader, build_loader
from sideways_cli.data.sampler import Position
from sideways_cli.data.transforms import ClipTransform, default_flip, default_resize
from sideways_cli.errors import UserError


CPU = torch.device("cpu")


def pin_memory_for(device: torch.device) -> bool:
    """Whether batches for ``device`` go to pinned (page-locked) memory: a GPU copies from it
    without a staging copy and, with ``runtime.to_device``, while earlier kernels still run."""
    return device.type == "cuda"


def data_loaders(cfg: Config, data: DatasetIndex, start: Position = (0, 0),
                 shard: tuple[int, int] = (0, 1),
                 device: torch.device = CPU) -> tuple[GuardedLoader, GuardedLoader]:
    """Train and val loaders; each reports videos that fail to decode and stops the run when a
    split has more than data.max_bad_fraction of them (counting those found at indexing). The
    training batches start at (epoch, position) ``start``; ``shard`` (replica, replicas): this
    replica's share of every batch and of the validation clips; ``device``: where the batches
    will go."""
    d = cfg.data
    train_tf = ClipTransform(size=d.size, resize=default_resize(d.dataset, d.resize),
                             flip=default_flip(d.dataset, d.flip))
    train_set = ClipDataset(data.train, clip_len=d.clip_len, frame_stride=d.frame_stride,
                            shuffle_frames=d.shuffle_frames, train=True, seed=cfg.seed,
                            decoder_backend=d.decoder, transform=train_tf)
    if len(train_set) < d.batch_size:
        raise UserError(f"data.batch_size={d.batch_size} is larger than the {len(train_set)} "
                        "training videos; lower data.batch_size")
    loader = build_loader(train_set, d.batch_size, shuffle=True, num_workers=d.num_workers,
                          seed=cfg.seed, drop_last=True, pin_memory=pin_memory_for(device),
                          start=start, shard=shard)
    return (_guarded(cfg, data, "train", loader),
            eval_loader(cfg, data, "val", shard=shard, device=device))


def eval_loader(cfg: Config, data: DatasetIndex, split: str = "val",
                clips_per_video: int | None = None, shard: tuple[int, int] = (0, 1),
                device: torch.device = CPU) -> GuardedLoader:
    """Evaluation clips of ``split``: ``clips_per_video`` (default eval.clips_per_video) evenly
    spaced clips per video, centre crop, no flip; ``shard``: every replicas-th clip; ``device``:
    where the batches will go."""
    d = cfg.data
    dataset = ClipDataset(data.split(split), clip_len=d.clip_len,
                          frame_stride=d.frame_stride, shuffle_frames=d.shuffle_frames, train=False,
                          clips_per_video=clips_per_video or cfg.eval.clips_per_video, seed=cfg.seed,
                          decoder_backend=d.decoder,
                          transform=ClipTransform(size=d.size, resize=default_resize(d.dataset, d.resize)))
    loader = build_loader(dataset, cfg.eval.batch_size, shuffle=False, num_workers=d.num_workers,
                          seed=cfg.seed, drop_last=False, pin_memory=pin_memory_for(device),
                          shard=shard)
    return _guarded(cfg, data, split, loader)


def _guarded(cfg: Config, data: DatasetIndex, split: str, loader) -> GuardedLoader:
    return GuardedLoader(loader, split, listed=data.listed.get(split, len(loader.dataset.entries)),
                         bad_at_index=data.bad.get(split, 0),
                         max_bad_fraction=cfg.data.max_bad_fraction, report=data.bad_files)


def forever(loader: Iterable[dict]) -> Iterator[dict]:
    """Batch after batch, epoch after epoch (each epoch's order follows from the seed)."""
    while True:
        yield from loader
