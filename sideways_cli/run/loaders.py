"""A run's data loaders, as its config describes them: training clips in the order that follows
from (seed, epoch, position), evaluation clips evenly spaced, each split guarded against videos
that do not decode; for a CUDA device, batches in pinned memory (see :func:`pin_memory_for`).
:func:`validate_training_memory` and :func:`eval_loader` refuse clips that the host's memory cannot
hold before any is built."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from sideways_cli.config import Config
from sideways_cli.data.catalog import DatasetIndex
from sideways_cli.data.datasets import ClipDataset, GuardedLoader, VideoEntry, build_loader
from sideways_cli.data.sampler import Position
from sideways_cli.data.transforms import ClipTransform, default_flip, default_resize
from sideways_cli.support.errors import UserError
from sideways_cli.support.stop_signals import STOP_SIGNALS


CPU = torch.device("cpu")
GIB = 2**30
# ClipTransform turns the decoded uint8 frames into float32 before it resizes and crops them, and
# the batches stay float32: 4 bytes a value, 3 values a pixel
BYTES_PER_VALUE = 4
CHANNELS = 3
PREFETCH_FACTOR = 2  # batches each worker loads ahead: the DataLoader's default, which build_loader keeps
MEMINFO = Path("/proc/meminfo")


def pin_memory_for(device: torch.device, decoder: str = "auto") -> bool:
    """Whether batches for ``device`` go to pinned (page-locked) memory: a GPU copies from it
    without a staging copy and, with ``runtime.to_device``, while earlier kernels still run.
    Not when the frames are decoded on the GPU already (``torchcodec-cuda``)."""
    return device.type == "cuda" and decoder != "torchcodec-cuda"


def data_loaders(cfg: Config, data: DatasetIndex, start: Position = (0, 0),
                 shard: tuple[int, int] = (0, 1),
                 device: torch.device = CPU) -> tuple[GuardedLoader, GuardedLoader]:
    """Train and val loaders; each reports videos that fail to decode and stops the run when a
    split has more than data.max_bad_fraction of them (counting those found at indexing). The
    training batches start at (epoch, position) ``start``; ``shard`` (replica, replicas): this
    replica's share of every batch and of the validation clips; ``device``: where the batches
    will go."""
    d = cfg.data
    train_set = ClipDataset(data.train, clip_len=d.clip_len, frame_stride=d.frame_stride,
                            shuffle_frames=d.shuffle_frames, train=True, seed=cfg.seed,
                            decoder_backend=d.decoder, transform=train_transform(cfg))
    step_clips = step_batch(cfg)
    if len(train_set) < step_clips:
        accumulated = f" x train.accumulate={cfg.train.accumulate}" if cfg.train.accumulate > 1 else ""
        raise UserError(f"data.batch_size={d.batch_size}{accumulated} is larger than the "
                        f"{len(train_set)} training videos; lower data.batch_size")
    loader = build_loader(train_set, step_clips, shuffle=True, num_workers=d.num_workers,
                          seed=cfg.seed, drop_last=True, pin_memory=pin_memory_for(device, cfg.data.decoder),
                          start=start, shard=shard, worker_init_fn=leave_stops_to_the_trainer)
    return (_guarded(cfg, data, "train", loader),
            _eval_loader(cfg, data, "val", None, shard, device, leave_stops_to_the_trainer))


def step_batch(cfg: Config) -> int:
    """The clips of a training step, which the loader yields together: train.accumulate batches
    of data.batch_size (so the epochs end, and the clips are drawn, as for one batch of them all)."""
    return cfg.data.batch_size * cfg.train.accumulate


def eval_loader(cfg: Config, data: DatasetIndex, split: str = "val",
                clips_per_video: int | None = None, shard: tuple[int, int] = (0, 1),
                device: torch.device = CPU) -> GuardedLoader:
    """Evaluation clips of ``split``: ``clips_per_video`` (default eval.clips_per_video) evenly
    spaced clips per video, each as eval.crops crops, no flip; ``shard``: every replicas-th clip;
    ``device``: where the batches will go."""
    validate_loader_memory(cfg, [val_load(cfg, shard, device)])
    return _eval_loader(cfg, data, split, clips_per_video, shard, device)


def leave_stops_to_the_trainer(worker_id: int) -> None:
    """A training run's loader workers ignore the stop signals (SIGTERM, SIGUSR1, Ctrl-C), which
    SLURM and a terminal send to every process: the training process finishes its step, writes
    its checkpoint, then stops its workers itself (``Session.close``). A worker killed first
    would fail the step in hand (torch raises in the trainer when a worker dies)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def train_transform(cfg: Config) -> ClipTransform:
    """The run's training resize, random crop, flip and per-clip augmentation (data.augment's
    resized_crop, randaugment and erasing; its mixup and cutmix mix batches, not clips)."""
    d, a = cfg.data, cfg.data.augment
    return ClipTransform(size=d.size, resize=default_resize(d.dataset, d.resize),
                         flip=default_flip(d.dataset, d.flip), mean=tuple(d.mean), std=tuple(d.std),
                         resized_crop=None if a.resized_crop is None else tuple(a.resized_crop),
                         randaugment=a.randaugment, erasing=a.erasing)


def eval_transform(cfg: Config) -> ClipTransform:
    """The run's evaluation resize, crop and normalisation (never a flip, never data.augment)."""
    d = cfg.data
    return ClipTransform(size=d.size, resize=default_resize(d.dataset, d.resize),
                         mean=tuple(d.mean), std=tuple(d.std))


def eval_dataset(cfg: Config, entries: list[VideoEntry],
                 clips_per_video: int | None = None) -> ClipDataset:
    """The evaluation views of ``entries``: ``clips_per_video`` (default eval.clips_per_video)
    evenly spaced clips each, as eval.crops crops."""
    d = cfg.data
    return ClipDataset(entries, clip_len=d.clip_len, frame_stride=d.frame_stride,
                       shuffle_frames=d.shuffle_frames, train=False,
                       clips_per_video=clips_per_video or cfg.eval.clips_per_video,
                       crops=cfg.eval.crops, seed=cfg.seed, decoder_backend=d.decoder,
                       transform=eval_transform(cfg))


def _eval_loader(cfg: Config, data: DatasetIndex, split: str, clips_per_video: int | None,
                 shard: tuple[int, int], device: torch.device,
                 worker_init_fn: Callable[[int], None] | None = None) -> GuardedLoader:
    d = cfg.data
    dataset = eval_dataset(cfg, data.split(split), clips_per_video)
    loader = build_loader(dataset, cfg.eval.batch_size, shuffle=False, num_workers=d.num_workers,
                          seed=cfg.seed, drop_last=False, pin_memory=pin_memory_for(device, cfg.data.decoder),
                          shard=shard, worker_init_fn=worker_init_fn)
    return _guarded(cfg, data, split, loader)


def _guarded(cfg: Config, data: DatasetIndex, split: str, loader) -> GuardedLoader:
    return GuardedLoader(loader, split, listed=data.listed.get(split, len(loader.dataset.entries)),
                         bad_at_index=data.bad.get(split, 0),
                         max_bad_fraction=cfg.data.max_bad_fraction, report=data.bad_files)


# -- host memory ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoaderLoad:
    """The clips one kind of loader holds at once, over every process of the host: ``copies``
    loaders (one per replica) of batches of ``batch_size`` clips of ``clip_len`` frames, frames
    ``side`` pixels square at their largest (resized, before the crop), ``workers`` worker
    processes each loading PREFETCH_FACTOR batches ahead, one batch in use and, for a GPU, its
    pinned copy."""

    name: str  # the key that sets batch_size: data.batch_size or eval.batch_size
    batch_size: int
    clip_len: int
    side: int
    workers: int
    pinned: bool
    copies: int = 1

    @property
    def batch_bytes(self) -> int:
        return self.batch_size * self.clip_len * CHANNELS * self.side**2 * BYTES_PER_VALUE

    @property
    def in_flight(self) -> int:
        """Batches alive at once, per loader."""
        return self.workers * PREFETCH_FACTOR + 1 + int(self.pinned)

    @property
    def bytes(self) -> int:
        return self.copies * self.in_flight * self.batch_bytes

    def describe(self) -> str:
        pinned = " + 1 pinned copy" if self.pinned else ""
        copies = f", x parallel.replicas={self.copies}" if self.copies > 1 else ""
        return (f"{self.name}={self.batch_size} clips x data.clip_len={self.clip_len} frames x "
                f"{CHANNELS}x{self.side}x{self.side} float32 = {self.batch_bytes / GIB:.2f} GiB a "
                f"batch, {self.in_flight} in flight (data.num_workers={self.workers} x "
                f"{PREFETCH_FACTOR} prefetched + 1 in use{pinned}){copies}")


def _side(cfg: Config) -> int:
    """The largest frame a worker holds, resized and not yet cropped: data.resize (its default
    for real data), else data.size (the synthetic frames are rendered at it). data.augment does
    not change it: resized_crop crops the resized frames and outputs data.size, like the crop."""
    return max(cfg.data.size, default_resize(cfg.data.dataset, cfg.data.resize) or 0)


def train_load(cfg: Config, device: torch.device = CPU) -> LoaderLoad:
    """The training loaders of every replica together: each holds its shard of data.batch_size."""
    name = "data.batch_size x train.accumulate" if cfg.train.accumulate > 1 else "data.batch_size"
    return LoaderLoad(name, step_batch(cfg), cfg.data.clip_len, _side(cfg),
                      max(0, cfg.data.num_workers), pin_memory_for(device, cfg.data.decoder))


def val_load(cfg: Config, shard: tuple[int, int] = (0, 1), device: torch.device = CPU) -> LoaderLoad:
    """The evaluation loaders: every replica's (``shard``: (index, replicas)) batches are whole
    eval.batch_size ones."""
    return LoaderLoad("eval.batch_size", cfg.eval.batch_size, cfg.data.clip_len, _side(cfg),
                      max(0, cfg.data.num_workers), pin_memory_for(device, cfg.data.decoder),
                      copies=shard[1])


def available_memory() -> int | None:
    """Bytes of host memory available to new allocations (MemAvailable of /proc/meminfo); None
    where that cannot be read (not Linux)."""
    try:
        for line in MEMINFO.read_text().splitlines():
            name, _, value = line.partition(":")
            if name == "MemAvailable":
                number, *unit = value.split()
                return int(number) * (1024 if unit == ["kB"] else 1)
    except (OSError, ValueError):
        return None
    return None


def validate_training_memory(cfg: Config, replicas: int = 1, device: torch.device = CPU) -> None:
    """:func:`validate_loader_memory` for a training run's loaders (:func:`data_loaders`), which
    needs nothing but the config: a training checks it first, before any data is read."""
    validate_loader_memory(cfg, [train_load(cfg, device), val_load(cfg, (0, replicas), device)])


def validate_loader_memory(cfg: Config, loads: list[LoaderLoad]) -> None:
    """UserError when the clips that ``loads`` hold at once would not fit in the host's available
    memory: better now, with the arithmetic, than a loader worker killed mid-run. Skipped where
    the available memory cannot be read."""
    available = available_memory()
    if available is None:
        return
    need = sum(load.bytes for load in loads)
    if need <= available:
        return
    knobs = list(dict.fromkeys(["data.clip_len", *(load.name for load in loads), "data.num_workers"]))
    if cfg.data.resize is not None:
        knobs.append("data.resize")
    raise UserError(f"the data loaders would hold about {need / GIB:.1f} GiB of clips, more than the "
                    f"{available / GIB:.1f} GiB of memory available: "
                    + "; ".join(load.describe() for load in loads)
                    + f"; lower {', '.join(knobs[:-1])} or {knobs[-1]}")


def forever(loader: Iterable[dict]) -> Iterator[dict]:
    """Batch after batch, epoch after epoch (each epoch's order follows from the seed)."""
    while True:
        yield from loader
