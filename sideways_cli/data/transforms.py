"""Spatial transforms of a clip: resize the short side, crop a square, maybe flip, normalise.

Training crops at random and may flip; evaluation crops the centre (or three crops along the long
side, ``eval.crops: 3``) and never flips, so its numbers are deterministic. Every frame of a clip gets the same crop and flip: a per-frame crop
would add motion that is not in the video.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

REAL_DATA_RESIZE = 128  # default short side for real datasets (data.resize unset)


def default_resize(dataset: str, resize: int | None) -> int | None:
    """``data.resize`` with its default filled in: synthetic frames are rendered at data.size
    and kept as they are; real videos come in any size and are brought to a common scale."""
    if resize is not None:
        return resize
    return None if dataset == "synthetic" else REAL_DATA_RESIZE


def default_flip(dataset: str, flip: bool | None) -> bool:
    """``data.flip`` with its default filled in. Never for synthetic: its classes are mirror
    pairs (a flip turns move_left into move_right); config validation refuses asking for it."""
    if dataset == "synthetic":
        return False
    return True if flip is None else flip


@dataclass(frozen=True)
class ClipTransform:
    size: int | None = None  # square crop side; None: frames as decoded (no crop)
    resize: int | None = None  # short side before the crop; None: no resize
    flip: bool = False  # random horizontal flip, training only
    mean: Sequence[float] = (0.45, 0.45, 0.45)
    std: Sequence[float] = (0.225, 0.225, 0.225)

    def spatial(self, frames: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> float [T, 3, size, size] in [0, 1]. A generator means training
        (random crop, maybe flip); None means evaluation (centre crop)."""
        x = self.resized(frames)
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            # (no crop, and no random draw, when the frames already have the size: the synthetic
            # dataset keeps the same random stream, and so the same clips, as before transforms)
            x = self._crop(x, generator)
        if self.flip and generator is not None and bool(torch.rand((), generator=generator) < 0.5):
            x = x.flip(-1)
        return x

    def resized(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> float [T, 3, H', W'] in [0, 1], the short side brought to
        ``resize`` (or up to ``size`` when smaller), not yet cropped."""
        x = frames.permute(0, 3, 1, 2).float().div_(255)
        short = self.resize
        if short is None and self.size is not None and min(x.shape[-2:]) < self.size:
            short = self.size  # too small to crop: bring it up to the crop size first
        if short is not None and min(x.shape[-2:]) != short:
            h, w = x.shape[-2:]
            scale = short / min(h, w)
            new = (max(short, round(h * scale)), max(short, round(w * scale)))
            x = F.interpolate(x, size=new, mode="bilinear", align_corners=False, antialias=True)
            x = x.clamp_(0, 1)
        return x

    def view(self, x: torch.Tensor, crop: int, crops: int) -> torch.Tensor:
        """Evaluation crop ``crop`` of ``crops`` of resized frames (:meth:`resized`): one is the
        centre; three run along the long side, its start, centre and end, as the 3-crop test of
        published video models takes them."""
        if self.size is None:
            return x
        h, w = x.shape[-2:]
        if crops == 1:
            top, left = (h - self.size) // 2, (w - self.size) // 2
        else:  # the long side's start, centre or end; the short side's centre
            along = [round(crop * (side - self.size) / (crops - 1)) for side in (h, w)]
            top, left = (along[0], (w - self.size) // 2) if h > w else ((h - self.size) // 2, along[1])
        return x[..., top : top + self.size, left : left + self.size]

    def _crop(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if generator is None:
            return self.view(x, 0, 1)
        h, w = x.shape[-2:]
        top = int(torch.randint(h - self.size + 1, (), generator=generator))
        left = int(torch.randint(w - self.size + 1, (), generator=generator))
        return x[..., top : top + self.size, left : left + self.size]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """float [T, 3, H, W] in [0, 1] -> normalised [3, T, H, W]."""
        scale = 1 / torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1, 1)
        shift = -torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1, 1) * scale
        # one pass that also lays the clip out as [3, T, H, W] (the loader's hottest arithmetic);
        # on the device the frames were decoded on (the GPU, with data.decoder torchcodec-cuda)
        out = torch.empty((3, *x.shape[:1], *x.shape[2:]), dtype=x.dtype, device=x.device)
        return torch.addcmul(shift, x.permute(1, 0, 2, 3), scale, out=out)
