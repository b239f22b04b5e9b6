"""The zoo's shape contract: stacks of frame-step modules ending in the head, cut by `depth`."""

from __future__ import annotations

import pytest
import torch

from sideways_cli.models import FULL_DEPTH, MODELS, RECONSTRUCTORS, ZOO, build_model
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


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_time_chunks_give_the_whole_clip_forward(name, k):
    """Evaluation's causal stream: each module carries its last k-1 inputs from chunk to chunk."""
    torch.manual_seed(0)
    model = build_model(name, 3 if name in RECONSTRUCTORS else 7, width=4, temporal_kernel=k).double()
    clip = torch.randn(2, 3, 11, 16, 16, dtype=torch.float64)
    whole = model(clip)
    for frames in (1, 2, 4, 11, 16):  # 11: the clip at once; 16: more than the clip
        stream = model.stream()
        chunked = torch.cat([stream(chunk) for chunk in clip.split(frames, dim=2)], dim=2)
        torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)


def test_a_stream_holds_only_each_modules_last_inputs():
    model = build_model("c3d", 5, width=4, temporal_kernel=3, depth=2)
    stream = model.stream()
    stream(torch.randn(1, 3, 8, 16, 16))
    windows = [m.window for m in model.stack]
    assert [None if h is None else h.shape[2] for h in stream.history] == \
        [k - 1 if k > 1 else None for k in windows]
    assert all(h is None or h.untyped_storage().size() == h.numel() * h.element_size()
               for h in stream.history)  # a copy, not a view that keeps the chunk alive
