"""Fixed-length clips from an index CSV (`path,label,num_frames,fps`), decoded on demand."""

from __future__ import annotations

import csv
import os
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .decode import Backend, DecodeError, open_video

_INDEX_COLUMNS = ("path", "label", "num_frames", "fps")


@dataclass(frozen=True)
class VideoEntry:
    path: Path  # absolute
    label: int
    num_frames: int
    fps: float


def read_index(csv_path: str | os.PathLike) -> list[VideoEntry]:
    """Read an index CSV; relative paths are resolved against the CSV's directory."""
    csv_path = Path(csv_path)
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
                        path=Path(os.path.abspath(csv_path.parent / row["path"])),
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


def _seeded(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) % 2**63)


class ClipDataset(Dataset):
    """Clips of `clip_len` frames, `frame_stride` apart, as normalised float32 [3, T, H, W].

    Train mode yields one random clip per video; eval mode yields `clips_per_video` clips per
    video at evenly spaced offsets, deterministically. There is deliberately no horizontal flip:
    it would turn move_left into move_right. Frames past the end of a short video repeat the
    last frame.
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
        mean: Sequence[float] = (0.45, 0.45, 0.45),
        std: Sequence[float] = (0.225, 0.225, 0.225),
        seed: int = 0,
        decoder_backend: Backend = "auto",
    ) -> None:
        if clip_len < 1 or frame_stride < 1 or clips_per_video < 1:
            raise ValueError("clip_len, frame_stride and clips_per_video must be >= 1")
        self.entries = list(entries)
        self.clip_len = clip_len
        self.frame_stride = frame_stride
        self.train = train
        self.shuffle_frames = shuffle_frames
        self.clips_per_video = 1 if train else clips_per_video
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1, 1)
        self.seed = seed
        self.decoder_backend = decoder_backend
        self._generator: torch.Generator | None = None
        self._span: tuple[int, int, torch.Tensor] | None = None  # (video, first frame, frames)

    def __len__(self) -> int:
        return len(self.entries) * self.clips_per_video

    def __getstate__(self) -> dict[str, Any]:
        # Sent to spawned workers: per-process state is rebuilt there.
        return {**self.__dict__, "_generator": None, "_span": None}

    def reseed(self, worker_seed: int) -> None:
        """Start this process's train-mode random stream; `build_loader` calls it in each worker."""
        self._generator = _seeded(self.seed, worker_seed)

    def clip_indices(self, video_idx: int, rng_or_clip_idx: torch.Generator | int) -> list[int]:
        """Frame indices of one clip in temporal order: a random clip (train mode, pass a
        generator) or clip number `rng_or_clip_idx` of `clips_per_video` (eval mode)."""
        num_frames = self.entries[video_idx].num_frames
        max_start = max(num_frames - ((self.clip_len - 1) * self.frame_stride + 1), 0)
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

    def _eval_start(self, max_start: int, clip_idx: int) -> int:
        if self.clips_per_video == 1:
            return max_start // 2
        return round(clip_idx * max_start / (self.clips_per_video - 1))

    def __getitem__(self, item: int) -> dict[str, Any]:
        video_idx, clip_idx = divmod(item, self.clips_per_video)
        if self.train:
            generator = self._train_generator()
            frames = self._decode(video_idx, self.clip_indices(video_idx, generator))
        else:
            generator = _seeded(self.seed, item)
            frames = self._decode_from_span(video_idx, self.clip_indices(video_idx, clip_idx))
        if self.shuffle_frames:
            frames = frames[torch.randperm(len(frames), generator=generator)]
        return {"clip": self._normalise(frames), "label": self.entries[video_idx].label, "video": video_idx}

    def _train_generator(self) -> torch.Generator:
        if self._generator is None:
            info = get_worker_info()
            self.reseed(info.seed if info is not None else 0)
        return self._generator

    def _decode(self, video_idx: int, indices: list[int]) -> torch.Tensor:
        # Opened per item, in whichever process runs __getitem__: decoder handles must never be
        # shared across a fork, and opening is cheap next to decoding.
        with closing(open_video(self.entries[video_idx].path, self.decoder_backend)) as decoder:
            last = decoder.num_frames - 1  # the index may overstate the length
            return decoder.get([min(i, last) for i in indices])

    def _decode_from_span(self, video_idx: int, indices: list[int]) -> torch.Tensor:
        # Eval visits a video's clips consecutively, so decode the span they cover once.
        if self._span is None or self._span[0] != video_idx:
            covered = [i for c in range(self.clips_per_video) for i in self.clip_indices(video_idx, c)]
            first, last = min(covered), max(covered)
            self._span = (video_idx, first, self._decode(video_idx, list(range(first, last + 1))))
        _, first, frames = self._span
        return frames[[min(i - first, len(frames) - 1) for i in indices]]

    def _normalise(self, frames: torch.Tensor) -> torch.Tensor:
        clip = frames.permute(3, 0, 1, 2).float().div_(255)
        return clip.sub_(self.mean).div_(self.std).contiguous()


def _init_worker(worker_id: int) -> None:
    # A forked worker inherits the parent's generator state; without a reseed every worker
    # would draw the same clips.
    info = get_worker_info()
    reseed = getattr(info.dataset, "reseed", None)
    if reseed is not None:
        reseed(info.seed)


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
) -> DataLoader:
    """A DataLoader whose order and per-worker randomness depend only on `seed`."""
    workers = max(0, num_workers)
    extra: dict[str, Any] = {}
    if workers:
        extra = dict(
            worker_init_fn=_init_worker, persistent_workers=True, multiprocessing_context=_worker_context()
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=pin_memory,
        **extra,
    )
