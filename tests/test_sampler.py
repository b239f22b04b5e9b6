"""Training order and item seeds as functions of (seed, epoch, position) only."""

from __future__ import annotations

import itertools

import pytest

from sideways_cli.data.sampler import SeededBatchSampler, epoch_order, item_seed


def stream(sampler: SeededBatchSampler, batches: int) -> list[list[tuple[int, int]]]:
    return [[tuple(d) for d in batch] for batch in itertools.islice(iter(sampler), batches)]


def test_each_epoch_is_a_permutation_of_its_own():
    orders = [epoch_order(seed=1, epoch=e, num_items=50) for e in range(3)]
    assert all(sorted(order) == list(range(50)) for order in orders)
    assert len({tuple(order) for order in orders}) == 3
    assert epoch_order(1, 0, 50) == orders[0] and epoch_order(2, 0, 50) != orders[0]


def test_item_seeds_depend_on_seed_epoch_and_position():
    seeds = {item_seed(s, e, p) for s in range(3) for e in range(3) for p in range(20)}
    assert len(seeds) == 3 * 3 * 20 and all(0 <= s < 2**63 for s in seeds)


def test_batches_follow_epoch_order_and_drop_the_remainder():
    sampler = SeededBatchSampler(10, 4, seed=3)  # two batches an epoch, 2 items dropped
    batches = stream(sampler, 4)
    order0, order1 = epoch_order(3, 0, 10), epoch_order(3, 1, 10)
    assert [v for v, _ in batches[0] + batches[1]] == order0[:8]
    assert [v for v, _ in batches[2] + batches[3]] == order1[:8]
    assert batches[2][1][1] == item_seed(3, 1, 1)
    assert stream(sampler, 4) == batches  # every iter() starts again at the start


@pytest.mark.parametrize("drop_last", [True, False])
def test_starting_anywhere_continues_the_same_stream(drop_last):
    full = SeededBatchSampler(10, 4, seed=3, drop_last=drop_last)
    at, positions = full.start, []
    for _ in range(7):
        positions.append(at)
        at = full.advance(at)
    everything = stream(full, 7)
    for k, position in enumerate(positions):
        resumed = SeededBatchSampler(10, 4, seed=3, drop_last=drop_last, start=position)
        assert stream(resumed, 7 - k) == everything[k:]
    if not drop_last:
        assert len(everything[2]) == 2  # the short last batch of the epoch


def test_a_position_past_the_last_full_batch_is_the_next_epoch():
    sampler = SeededBatchSampler(10, 4, seed=3, start=(0, 8))
    assert sampler.start == (1, 0)
    with pytest.raises(ValueError):
        SeededBatchSampler(3, 4, seed=0)
