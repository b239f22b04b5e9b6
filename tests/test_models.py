"""The zoo's shape contract: stacks of frame-step modules ending in the head, cut by `depth`."""

from __future__ import annotations

import pytest
import torch

from sideways_cli.models import FULL_DEPTH, ZOO, build_model
from sideways_cli.models.blocks import standardize


@pytest.mark.parametrize("name", sorted(ZOO))
def test_depth_keeps_the_first_modules_and_the_head(name):
    full = build_model(name, 10, width=8)
    assert len(full.stack) == FULL_DEPTH[name] + 1 and full.names[-1] == "head"
    cut = build_model(name, 10, width=8, depth=2)
    assert cut.names == full.names[:2] + ["head"]
    logits = cut(torch.randn(2, 3, 5, 32, 32))
    assert logits.shape == (2, 10, 5)


def test_standardized_filters_have_zero_mean_and_unit_variance():
    w = standardize(torch.randn(6, 4, 3, 3, 3, dtype=torch.float64) * 5 + 2)
    flat = w.flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(flat.var(1, unbiased=False), torch.ones(6, dtype=torch.float64),
                               rtol=1e-4, atol=1e-4)
