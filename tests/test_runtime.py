"""Process-wide run settings: the device, deterministic algorithms, a loss that CUDA can run
deterministically."""

from __future__ import annotations

import os

import pytest
import torch

from sideways_cli.engine.losses import clip_loss, flat_clip_loss
from sideways_cli.errors import UserError
from sideways_cli.runtime import resolve_device, set_deterministic


def test_deterministic_sets_the_flags_and_the_cublas_workspace(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        set_deterministic(False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_cuda_is_a_clear_error():
    with pytest.raises(UserError, match="no CUDA device is available; use --device cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_the_flat_clip_loss_cuda_uses_is_the_same_mean():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(4, 5, 7, generator=g, dtype=torch.float64), torch.tensor([0, 3, 1, 4])
    torch.testing.assert_close(flat_clip_loss(logits, labels), clip_loss(logits, labels), rtol=1e-12, atol=0)
