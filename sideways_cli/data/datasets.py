"""Fixed-length clips from an index CSV (`path,label,num_frames,fps`), decoded on demand,
and the loader that reports videos failing to decode at run time."""

from __future__ import annotations

import csv
import os
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from rich.console import Console
from torch.utils.data import DataLoader, Dataset, default_collate

from sideways_cli.support.errors import UserError

from .decode import Backend, DecodeError, VideoDecodeError, open_video
from .sampler import Draw, Position, SeededBatchSampler, item_seed
from .transforms import ClipTransform

_INDEX_COLUMNS = ("path", "label", "num_frames", "fps")


@dataclass(frozen=True)
class VideoEntry:
    path: Path  # absolute
    label: int
    num_frames: int
    fps: float


def read_index(csv_path: str | os.PathLike, root: str | os.PathLike | None = None) -> list[VideoEntry]:
    """Read an index CSV; relative paths are resolved against `root`, by default the CSV's
    directory. Extra columns are allowed and ignored."""
    csv_path = Path(csv_path)
    base = Path(root) if root is not None else csv_path.parent
    if not csv_path.is_file():
        raise DecodeError(f"index file {csv_path} does not exist")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _INDEX_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            expected = ",".join(_INDEX_COLUMNS)
            raise DecodeError(f"{csv_path}: missing column(s) {', '.join(missing)}; expected {expected}")
        entries = []
        for line, row in enumerate(reader, start=2):
            try:
                entries.append(
                    VideoEntry(
                        path=Path(os.path.abspath(base / row["path"])),
                        label=int(row["label"]),
                        num_frames=int(row["num_frames"]),
                        fps=float(row["fps"]),
                    )
                )
            except (TypeError, ValueError) as exc:
                raise DecodeError(f"{csv_path}:{line}: malformed row {row}") from exc
    return entries


def read_labels(labels_txt: str | os.PathLike) -> list[str]:
    return [line.strip() for line in Path(labels_txt).read_text().splitlines() if line.strip()]


def clip_span(clip_len: int, frame_stride: int) -> int:
    """Frames one clip covers; shorter videos are padded with their last frame."""
    return (clip_len - 1) * frame_stride + 1


def _seeded(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) % 2**63)


_MAX_REDRAWS = 20  # unreadable videos in a row before a training item gives up


class ClipDataset(Dataset):
    """Clips of `clip_len` frames, `frame_stride` apart, as normalised float32 [3, T, H, W].

    Train mode yields one random clip per video, everything random about it drawn from the item's
    seed: index it with a :class:`~.sampler.Draw` (video, seed), as `SeededBatchSampler` does,
    or with a plain video number, which takes the seed of that position of epoch 0. Eval mode
    yields `clips_per_video` clips per video at evenly spaced offsets, each as `crops` crops
    (centre, or along the long side), deterministically. `transform` resizes and crops (random in
    train mode, those views in eval mode) and, in train mode only, may flip and augment; the
    default keeps frames as decoded and never flips (the synthetic classes are mirror pairs).
    Frames past the end of a short video repeat the last frame.

    A video that fails to decode is never replaced silently: the item lists it under "failed"
    (path, reason) for the main process to report (`GuardedLoader`). In train mode another video
    is drawn in its place; in eval mode the item has no "clip" and `collate_clips` drops it.
    """

    def __init__(
        self,
        entries: Sequence[VideoEntry],
        clip_len: int,
        frame_stride: int = 1,
        *,
        train: bool,
        shuffle_frames: bool = False,
        clips_per_video: int = 1,
        crops: int = 1,
        mean: Sequence[float] = (0.45, 0.45, 0.45),
        std: Sequence[float] = (0.225, 0.225, 0.225),
        seed: int = 0,
        decoder_backend: Backend = "auto",
        transform: ClipTransform | None = None,
    ) -> None:
        if clip_len < 1 or frame_stride < 1 or clips_per_video < 1 or crops < 1:
            raise ValueError("clip_len, frame_stride, clips_per_video and crops must be >= 1")
        self.entries = list(entries)
        self.clip_len = clip_len
        self.frame_stride = frame_stride
        self.train = train
        self.shuffle_frames = shuffle_frames
        self.clips_per_video = 1 if train else clips_per_video
        self.crops = 1 if train else crops
        self.transform = transform or ClipTransform(mean=tuple(mean), std=tuple(std))
        self.seed = seed
        self.decoder_backend = decoder_backend
        self._span: tuple[int, int, torch.Tensor] | None = None  # (video, first frame, frames)
        self._bad: set[int] = set()  # videos this process failed to decode: not retried

    def __len__(self) -> int:
        return len(self.entries) * self.clips_per_video * self.crops

    def __getstate__(self) -> dict[str, Any]:
        # Sent to spawned workers: per-process state is rebuilt there.
        return {**self.__dict__, "_span": None, "_bad": set()}

    def clip_indices(self, video_idx: int, rng_or_clip_idx: torch.Generator | int) -> list[int]:
        """Frame indices of one clip in temporal order: a random clip (train mode, pass a
        generator) or clip number `rng_or_clip_idx` of `clips_per_video` (eval mode)."""
        num_frames = self.entries[video_idx].num_frames
        max_start = max(num_frames - self.span_frames, 0)
        if self.train:
            if not isinstance(rng_or_clip_idx, torch.Generator):
                raise TypeError("train mode samples clips at random: pass a torch.Generator")
            start = int(torch.randint(max_start + 1, (1,), generator=rng_or_clip_idx))
        else:
            if isinstance(rng_or_clip_idx, torch.Generator):
                raise TypeError("eval mode takes a clip number, not a generator")
            if not 0 <= rng_or_clip_idx < self.clips_per_video:
                raise IndexError(f"clip number {rng_or_clip_idx} not in [0, {self.clips_per_video})")
            start = self._eval_start(max_start, rng_or_clip_idx)
        return [min(start + k * self.frame_stride, num_frames - 1) for k in range(self.clip_len)]

    @property
    def span_frames(self) -> int:
        return clip_span(self.clip_len, self.frame_stride)

    def _eval_start(self, max_start: int, clip_idx: int) -> int:
        if self.clips_per_video == 1:
            return max_start // 2
        return round(clip_idx * max_start / (self.clips_per_video - 1))

    def __getitem__(self, item: int | Draw) -> dict[str, Any]:
        if self.train:
            draw = item if isinstance(item, Draw) else Draw(item, item_seed(self.seed, 0, item))
            return self._train_item(draw.video, torch.Generator().manual_seed(draw.seed))
        video_idx, view = divmod(item, self.clips_per_video * self.crops)
        clip_idx, crop = divmod(view, self.crops)
        entry = self.entries[video_idx]
        try:
            frames = self._eval_frames(video_idx, self.clip_indices(video_idx, clip_idx), crop)
        except VideoDecodeError as exc:
            return {"label": entry.label, "video": video_idx, "failed": self._failure(video_idx, exc)}
        if self.shuffle_frames:
            frames = frames[torch.randperm(len(frames), generator=_seeded(self.seed, item))]
        return {"clip": self.transform.normalise(frames), "label": entry.label, "video": video_idx,
                "failed": []}

    def _train_item(self, video_idx: int, generator: torch.Generator) -> dict[str, Any]:
        failed: list[tuple[str, str]] = []
        for _ in range(_MAX_REDRAWS):
            # drawn whether or not the video is known bad here, so every process (whatever it
            # has seen fail before) consumes the generator alike and ends on the same clip
            indices = self.clip_indices(video_idx, generator)
            if video_idx not in self._bad:
                try:
                    frames = self._decode(video_idx, indices)
                    break
                except VideoDecodeError as exc:
                    failed += self._failure(video_idx, exc)
            video_idx = int(torch.randint(len(self.entries), (1,), generator=generator))
        else:
            raise DecodeError(f"{_MAX_REDRAWS} videos drawn in a row could not be decoded (last: "
                              f"{self.entries[video_idx].path}); check the dataset's videos")
        frames = self.transform.spatial(frames, generator)
        if self.shuffle_frames:
            frames = frames[torch.randperm(len(frames), generator=generator)]
        clip = self.transform.erase(self.transform.normalise(frames), generator)
        return {"clip": clip, "label": self.entries[video_idx].label, "video": video_idx,
                "failed": failed}

    def _failure(self, video_idx: int, exc: VideoDecodeError) -> list[tuple[str, str]]:
        # Reported once per process; the main process reports each path once overall.
        if video_idx in self._bad:
            return []
        self._bad.add(video_idx)
        return [(str(self.entries[video_idx].path), exc.reason)]

    def _decode(self, video_idx: int, indices: list[int]) -> torch.Tensor:
        # Opened per item, in whichever process runs __getitem__ (a DataLoader worker): decoder
        # handles must never be shared across a fork, and opening is cheap next to decoding.
        # closing() releases the reader (and its threads and buffers) as soon as the clip is out.
        if video_idx in self._bad:
            raise VideoDecodeError(self.entries[video_idx].path, "failed before in this process")
        try:
            with closing(open_video(self.entries[video_idx].path, self.decoder_backend)) as decoder:
                last = decoder.num_frames - 1  # the index may overstate the length
                return decoder.get([min(i, last) for i in indices])
        except (IndexError, ValueError) as exc:  # a reader that disagrees with itself
            raise VideoDecodeError(self.entries[video_idx].path, str(exc)) from exc

    def _eval_frames(self, video_idx: int, indices: list[int], crop: int) -> torch.Tensor:
        # Eval visits a video's views consecutively, so decode the one contiguous span they cover
        # once (sequential decoding, no seeks), resize it once and take each view's crop of it.
        if self._span is None or self._span[0] != video_idx:
            self._span = None  # release the previous video's frames before decoding the next
            covered = [i for c in range(self.clips_per_video) for i in self.clip_indices(video_idx, c)]
            first, last = min(covered), max(covered)
            frames = self._decode(video_idx, list(range(first, last + 1)))
            self._span = (video_idx, first, self.transform.resized(frames))
        _, first, frames = self._span
        return self.transform.view(frames[[min(i - first, len(frames) - 1) for i in indices]],
                                   crop, self.crops)


def collate_clips(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch the items that have a clip; gather every item's decode failures under "failed"."""
    failed = [f for item in items for f in item.get("failed", ())]
    kept = [{k: v for k, v in item.items() if k != "failed"} for item in items if "clip" in item]
    batch = default_collate(kept) if kept else {}
    batch["failed"] = failed
    return batch


class GuardedLoader:
    """A DataLoader whose decode failures are reported once by name and counted against the
    split's `max_bad_fraction` (together with the videos already found bad at indexing)."""

    def __init__(self, loader: DataLoader, split: str, listed: int, bad_at_index: int = 0,
                 max_bad_fraction: float = 1.0, report: Path | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
        self.loader = loader
        self.split, self.listed, self.bad_at_index = split, listed, bad_at_index
        self.max_bad_fraction, self.report = max_bad_fraction, report
        self.warn = warn or Console(stderr=True, highlight=False, soft_wrap=True).print
        self.failed: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            self.note_unreadable(batch.pop("failed"))
            if "clip" in batch:  # an eval batch whose every clip failed has nothing to yield
                yield batch

    def close(self) -> None:
        """Stop the loader's worker processes now (they persist between passes), rather than
        when the loader is collected."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None

    def note_unreadable(self, failed: list[tuple[str, str]]) -> None:
        """Warn once per unreadable video; too many unreadable ones stop the run."""
        for path, reason in failed:
            if path not in self.failed:
                self.failed[path] = reason
                self.warn(f"warning: skipping unreadable {self.split} video {path}: {reason}")
        bad = self.bad_at_index + len(self.failed)
        if failed and bad > self.max_bad_fraction * self.listed:
            where = f"; the indexing report is {self.report}" if self.report else ""
            raise UserError(f"{bad} of the {self.listed} {self.split} videos are unreadable, more "
                            f"than data.max_bad_fraction={self.max_bad_fraction:g} (the "
                            f"{len(self.failed)} found during this run are named above{where}); "
                            "repair or remove them, or raise data.max_bad_fraction")


def _worker_context() -> str:
    # Fork is cheap and safe on Linux: workers only decode and normalise on the CPU, and each
    # opens its own readers. macOS system libraries are not fork-safe.
    return "fork" if sys.platform.startswith("linux") else "spawn"


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    drop_last: bool = False,
    *,
    pin_memory: bool = False,
    start: Position = (0, 0),
    shard: tuple[int, int] = (0, 1),
    worker_init_fn: Callable[[int], None] | None = None,
) -> DataLoader:
    """A DataLoader whose batches depend only on `seed`, never on `num_workers`.

    `shuffle` (training): an endless stream of batches, epoch after epoch, from (epoch, position)
    `start` (:class:`SeededBatchSampler`; each item a :class:`Draw`). Otherwise one pass over the
    dataset in its order. `shard` (index, count): training batches are that slice of every batch
    of `batch_size`; one pass takes every count-th item from the index-th. `worker_init_fn` runs
    first in each worker process.
    """
    workers = max(0, num_workers)
    extra: dict[str, Any] = {}
    if workers:
        extra = dict(persistent_workers=True, multiprocessing_context=_worker_context())
    if shuffle:
        sampler = SeededBatchSampler(len(dataset), batch_size, seed, drop_last=drop_last, start=start,
                                     shard=shard)
        extra["batch_sampler"] = sampler
    else:
        index, count = shard
        extra.update(batch_size=batch_size, drop_last=drop_last,
                     sampler=range(index, len(dataset), count) if count > 1 else None)
    return DataLoader(
        dataset,
        num_workers=workers,
        collate_fn=collate_clips,
        # the loader draws its workers' base seed at every iteration: from its own generator,
        # not the global one, so how often it is iterated cannot shift the run's dropout masks
        generator=torch.Generator().manual_seed(seed),
        pin_memory=pin_memory,
        worker_init_fn=worker_init_fn,
        **extra,
    )
