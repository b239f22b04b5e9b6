"""Training order and per-item randomness as functions of (seed, epoch, position in the epoch).

Nothing depends on which process draws a clip or how many DataLoader workers there are: epoch e
visits the videos in a permutation drawn from (seed, e), and the item at position p of epoch e
carries a seed drawn from (seed, e, p) from which the dataset takes everything random about that
item (clip start, crop, flip, augmentation, frame shuffle, replacements for unreadable videos). So
the training data is the same with 0 or 8 workers, and a resumed run can start the sampler at any
(epoch, position) and get exactly the batches an uninterrupted run would have had.
"""

from __future__ import annotations

import hashlib
from typing import Iterator, NamedTuple

import torch
from torch.utils.data import Sampler

Position = tuple[int, int]  # (epoch, position of the next item within that epoch)


class Draw(NamedTuple):
    """What a training item is asked for: a video and the seed of everything random about it."""

    video: int
    seed: int


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from its parts; hashed, so neighbouring epochs or positions are unrelated."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def item_seed(seed: int, epoch: int, position: int) -> int:
    return derive_seed("item", seed, epoch, position)


def epoch_order(seed: int, epoch: int, num_items: int) -> list[int]:
    """The permutation of the videos that epoch ``epoch`` visits."""
    generator = torch.Generator().manual_seed(derive_seed("order", seed, epoch))
    return torch.randperm(num_items, generator=generator).tolist()


class SeededBatchSampler(Sampler[list[Draw]]):
    """Batches of :class:`Draw` for a DataLoader's ``batch_sampler``: endless, epoch after epoch,
    from (epoch, position) ``start``.

    Endless because a DataLoader may call ``iter()`` on its sampler more than once per pass (its
    worker iterator does at start-up): every ``iter()`` starts again at ``start``, and the one pass
    the trainer makes never ends. The DataLoader draws batches ahead of what the trainer has
    consumed (prefetching), so the trainer tracks its position itself with :meth:`advance`.

    ``shard`` (index, count): yield only that equal slice of every batch, as replica ``index`` of
    ``count`` data-parallel replicas does; the shards of a batch are the whole batch, in order.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, drop_last: bool = True,
                 start: Position = (0, 0), shard: tuple[int, int] = (0, 1)):
        if num_items < 1 or batch_size < 1 or (drop_last and batch_size > num_items):
            raise ValueError(f"cannot draw batches of {batch_size} from {num_items} items")
        index, count = shard
        if batch_size % count or not 0 <= index < count:
            raise ValueError(f"cannot cut batches of {batch_size} into shard {index} of {count}")
        self.shard = shard
        self.num_items, self.batch_size, self.seed, self.drop_last = num_items, batch_size, seed, drop_last
        self.start = self.normalise(start)
        self._order: tuple[int, list[int]] = (-1, [])  # the last epoch's permutation

    def normalise(self, at: Position) -> Position:
        """``at``, or the next epoch's start when the rest of its epoch holds no batch."""
        epoch, position = at
        remaining = self.num_items - position
        if remaining <= 0 or (self.drop_last and remaining < self.batch_size):
            return epoch + 1, 0
        return epoch, position

    def advance(self, at: Position) -> Position:
        """Where the batch after the one starting at ``at`` starts."""
        epoch, position = self.normalise(at)
        return self.normalise((epoch, position + self.batch_size))

    def batch(self, at: Position) -> list[Draw]:
        """The batch that starts at ``at``."""
        epoch, position = self.normalise(at)
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.seed, epoch, self.num_items))
        stop = min(position + self.batch_size, self.num_items)
        return [Draw(self._order[1][p], item_seed(self.seed, epoch, p)) for p in range(position, stop)]

    def __iter__(self) -> Iterator[list[Draw]]:
        index, count = self.shard
        size = self.batch_size // count
        at = self.start
        while True:
            yield self.batch(at)[index * size:(index + 1) * size]
            at = self.advance(at)
