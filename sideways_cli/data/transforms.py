"""Spatial transforms of a clip: resize the short side, crop a square, maybe flip, normalise.

Training crops at random and may flip; evaluation crops the centre (or three crops along the long
side, ``eval.crops: 3``) and never flips, so its numbers are deterministic. Every frame of a clip
gets the same crop and flip: a per-frame crop would add motion that is not in the video.

Training may also augment (``data.augment``), in the order of the timm and torchvision video
recipes: resize -> RandomResizedCrop (in place of the random crop) -> flip -> RandAugment ->
normalise -> random erasing. Each is a ``torchvision.transforms.v2`` transform applied to the whole
clip as one [T, C, H, W] tensor: v2 draws its parameters once per call and applies them to every
leading index, so one draw per clip lands on all its frames alike, like the crop and the flip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

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


_SEED_RANGE = 2**63 - 1  # what torch.Generator.manual_seed takes


def seeded(transform: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
           generator: torch.Generator) -> torch.Tensor:
    """``transform(x)`` for a v2 transform, whose random draws come from torch's global CPU
    generator, made a function of the item's ``generator``: the global generator is seeded from it
    for the call and put back as it was after. So the clip is the same in any loader worker (or in
    the training process) and on resume, and the process's own random stream (dropout masks,
    with data.num_workers 0) does not move. By hand rather than ``torch.random.fork_rng`` +
    ``torch.manual_seed``: manual_seed reseeds every CUDA device's generator too (the training
    process's, with data.num_workers 0: its dropout masks would follow the data), and fork_rng
    queries the accelerator (CUDA) at every call, which a loader worker has no need of; v2's
    parameters are drawn on the CPU generator alone, the one saved and restored here."""
    seed = int(torch.randint(_SEED_RANGE, (), generator=generator))
    state = torch.get_rng_state()
    try:
        torch.default_generator.manual_seed(seed)
        return transform(x)
    finally:
        torch.set_rng_state(state)


@dataclass(frozen=True)
class ClipTransform:
    size: int | None = None  # square crop side; None: frames as decoded (no crop)
    resize: int | None = None  # short side before the crop; None: no resize
    flip: bool = False  # random horizontal flip, training only
    mean: Sequence[float] = (0.45, 0.45, 0.45)
    std: Sequence[float] = (0.225, 0.225, 0.225)
    # data.augment's per-clip knobs, training only, each off by default. Each draws from the item's
    # generator only when on, so with all of them off every clip is what it was without them.
    resized_crop: tuple[float, float] | None = None  # RandomResizedCrop's area range, for the crop
    randaugment: int | None = None  # RandAugment's magnitude (of 31 bins), after the flip
    erasing: float = 0.0  # random erasing's probability, on the normalised clip (:meth:`erase`)

    def __post_init__(self) -> None:
        if self.resized_crop is not None and self.size is None:
            raise ValueError("resized_crop resizes its crop to size: give a size")

    def spatial(self, frames: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> float [T, 3, size, size] in [0, 1]. A generator means training
        (random crop, maybe flip, the augmentation asked for); None means evaluation (centre
        crop)."""
        x = self.resized(frames)
        if self.resized_crop is not None and generator is not None:
            x = seeded(self._random_resized_crop, x, generator)
        elif self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            # (no crop, and no random draw, when the frames already have the size: the synthetic
            # dataset keeps the same random stream, and so the same clips, as before transforms)
            x = self._crop(x, generator)
        if self.flip and generator is not None and bool(torch.rand((), generator=generator) < 0.5):
            x = x.flip(-1)
        if self.randaugment is not None and generator is not None:
            # On the float frames as they are: every op of v2's RandAugment has a float kernel for
            # [0, 1] images (solarize's threshold and posterize's levels scale to 1.0, brightness
            # and the others clamp to it; equalize bins through uint8 itself) and agrees with the
            # uint8 path to within a level (1.3/255 at most), so an 8-bit round trip would only add
            # a quantisation of frames the bilinear resize made finer than 8 bits. Nearest
            # interpolation and a black fill for the geometric ops, torchvision's defaults.
            # Equalize, autocontrast and contrast follow each frame's own histogram, as v2 does
            # for a video: the op and its magnitude are the one draw, their effect on content
            # per frame.
            x = seeded(v2.RandAugment(num_ops=2, magnitude=self.randaugment), x, generator)
        return x

    def _random_resized_crop(self, x: torch.Tensor) -> torch.Tensor:
        # a crop of random area (a fraction in resized_crop of the resized frame) and aspect ratio
        # (3/4..4/3, v2's default), resized to size x size: bilinear, antialiased like resized()
        crop = v2.RandomResizedCrop((self.size, self.size), scale=self.resized_crop, antialias=True)
        return crop(x).clamp_(0, 1)

    def erase(self, clip: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """A normalised [3, T, H, W] clip (:meth:`normalise`), in training with probability
        ``erasing`` a random rectangle of it set to 0, the mean, in every frame; evaluation (no
        generator) and erasing 0 leave it as it is. After the normalisation, as torchvision's
        recipes erase, so 0 is the mean colour rather than black."""
        if not self.erasing or generator is None:
            return clip
        # v2 reads [..., C, H, W]: erase through a [T, 3, H, W] view of the clip, in place (the
        # clip is the normalisation's fresh tensor), so the [3, T, H, W] layout stays contiguous
        erasing = v2.RandomErasing(p=self.erasing, value=0, inplace=True)
        seeded(erasing, clip.permute(1, 0, 2, 3), generator)
        return clip

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
