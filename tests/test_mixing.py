"""MixUp and CutMix (``data/mixing.py``): pairs of clips blended as much as their labels, the same
whichever replica mixes them, one box for every frame of a clip."""

from __future__ import annotations

import pytest
import torch

from sideways_cli.data.mixing import BatchMix

CLASSES = 5


def batch(size: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(size, 3, 4, 8, 8, generator=g, dtype=torch.float64),
            torch.randint(CLASSES, (size,), generator=g))


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_each_pair_is_blended_as_much_as_its_labels(mixup, cutmix):
    clips, labels = batch()
    mixed, targets = BatchMix(mixup, cutmix, CLASSES)(clips, labels, seed=1, at=(0, 0), first=0)
    torch.testing.assert_close(targets.sum(1), torch.ones(6, dtype=torch.float64))
    for a in range(0, 6, 2):
        b = a + 1
        lam = float(targets[a, labels[a]]) if labels[a] != labels[b] else None
        # every pixel of a comes from a or b, and the share of a's pixels is lam: the label's
        from_a = torch.isclose(mixed[a], clips[a])
        if cutmix and not mixup:  # the box: the same pixels in every frame of the clip
            assert torch.equal(from_a, from_a[:, :1].expand_as(from_a))
            if lam is not None:
                assert from_a.double().mean().item() == pytest.approx(lam, abs=1e-12)
        if mixup and not cutmix and lam is not None:
            torch.testing.assert_close(mixed[a], lam * clips[a] + (1 - lam) * clips[b])
        # the pair's other clip is mixed the other way round: between them, both labels whole
        one_hot = torch.nn.functional.one_hot(labels, CLASSES).double()
        torch.testing.assert_close(targets[a] + targets[b], one_hot[a] + one_hot[b])
        torch.testing.assert_close(mixed[a] + mixed[b], clips[a] + clips[b])


def test_a_pair_mixes_alike_in_any_shard_and_on_every_call():
    """The draws are the pair's (seed, epoch, its place in the epoch): a replica mixing its half
    of the batch mixes it as one process mixes the whole, and again after a resume."""
    clips, labels = batch(8)
    mix = BatchMix(0.4, 1.0, CLASSES)
    whole = mix(clips, labels, seed=3, at=(2, 16), first=0)
    halves = [mix(clips[i:i + 4], labels[i:i + 4], seed=3, at=(2, 16), first=i) for i in (0, 4)]
    torch.testing.assert_close(torch.cat([h[0] for h in halves]), whole[0])
    torch.testing.assert_close(torch.cat([h[1] for h in halves]), whole[1])
    again = mix(clips, labels, seed=3, at=(2, 16), first=0)
    assert torch.equal(again[0], whole[0]) and torch.equal(again[1], whole[1])
    other = mix(clips, labels, seed=3, at=(2, 24), first=0)
    assert not torch.equal(other[1], whole[1])


def test_an_odd_clip_out_stays_as_it_is():
    clips, labels = batch(5)
    mixed, targets = BatchMix(0.4, 0.0, CLASSES)(clips, labels, seed=0, at=(0, 0), first=0)
    assert torch.equal(mixed[4], clips[4])
    assert targets[4, labels[4]] == 1
    assert not BatchMix(0.0, 0.0, CLASSES).on
