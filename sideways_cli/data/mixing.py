"""MixUp and CutMix (``data.augment.mixup``, ``data.augment.cutmix``): clips blended in pairs,
their labels blended as much, into class probabilities both rules' losses take.

The pairs are the batch's clips 0 and 1, 2 and 3, ...: each clip of a pair is mixed with the
other, by one ``lam`` drawn for the pair (timm's "pair" mode). Everything random about a pair
comes from (seed, epoch, position of its first clip in the epoch), never from which process
mixes it, so a batch sharded over replicas (each shard an even number of clips) is mixed exactly
as in one process, and a resumed run as in an uninterrupted one, with no random stream to carry.

MixUp blends whole clips: ``lam * a + (1 - lam) * b``. CutMix pastes the same box of the other
clip into every frame (one draw per clip: a box that moved from frame to frame would be motion
that is in neither video), and ``lam`` becomes the share of the frame the box leaves. With both
on, each pair is mixed one way or the other, with even odds.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sideways_cli.data.sampler import Position, derive_seed


@dataclass(frozen=True)
class BatchMix:
    mixup: float  # MixUp's Beta(alpha, alpha); 0: off
    cutmix: float  # CutMix's; 0: off
    classes: int

    @property
    def on(self) -> bool:
        return bool(self.mixup or self.cutmix)

    def __call__(self, clips: torch.Tensor, labels: torch.Tensor, seed: int, at: Position,
                 first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips [B, C, T, H, W] and labels [B] mixed in pairs -> (mixed clips, class
        probabilities [B, K] in the clips' dtype). ``at``: the (epoch, position) the whole batch
        starts at; ``first``: where this shard of it starts within the batch (even). An odd
        clip out at the end of a shard stays as it is."""
        mixed = clips.clone()
        targets = F.one_hot(labels, self.classes).to(clips.dtype)
        out = targets.clone()
        epoch, position = at
        for a in range(0, len(clips) - 1, 2):
            b = a + 1
            draws = random.Random(derive_seed("mix", seed, epoch, position + first + a))
            lam = self._mix_pair(mixed, clips, a, b, draws)
            out[a] = lam * targets[a] + (1 - lam) * targets[b]
            out[b] = lam * targets[b] + (1 - lam) * targets[a]
        return mixed, out

    def _mix_pair(self, mixed: torch.Tensor, clips: torch.Tensor, a: int, b: int,
                  draws: random.Random) -> float:
        """Mixes clips a and b into ``mixed`` by the pair's draws; returns ``lam``, the share of
        each clip's own label."""
        cut = self.cutmix > 0 and (self.mixup == 0 or draws.random() < 0.5)
        lam = draws.betavariate(*(2 * [self.cutmix if cut else self.mixup]))
        if not cut:
            mixed[a] = lam * clips[a] + (1 - lam) * clips[b]
            mixed[b] = lam * clips[b] + (1 - lam) * clips[a]
            return lam
        height, width = clips.shape[-2:]
        side = math.sqrt(1 - lam)  # the box's share of each side, so 1 - lam of the area
        box_h, box_w = round(height * side), round(width * side)
        centre_y, centre_x = draws.randrange(height), draws.randrange(width)
        top, bottom = max(centre_y - box_h // 2, 0), min(centre_y + box_h - box_h // 2, height)
        left, right = max(centre_x - box_w // 2, 0), min(centre_x + box_w - box_w // 2, width)
        mixed[a, ..., top:bottom, left:right] = clips[b, ..., top:bottom, left:right]
        mixed[b, ..., top:bottom, left:right] = clips[a, ..., top:bottom, left:right]
        return 1 - (bottom - top) * (right - left) / (height * width)  # what the clipped box left
