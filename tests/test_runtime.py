"""Process-wide run settings: the device, the backends' numerics (deterministic algorithms, cuDNN
autotuning, TF32), a loss that CUDA can run deterministically."""

from __future__ import annotations

import os

import pytest
import torch

from sideways_cli.config import load_config, to_dict
from sideways_cli.engine.losses import clip_loss, frame_loss
from sideways_cli.support.errors import UserError
from sideways_cli.support.runtime import configure_backends, resolve_device


@pytest.fixture
def backends(monkeypatch):
    """The process-wide settings configure_backends changes, put back afterwards."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark,
              cudnn.allow_tf32, matmul.allow_tf32)
    yield
    torch.use_deterministic_algorithms(before[0])
    cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = before[1:]


def settings() -> tuple[bool, ...]:
    """(deterministic algorithms, cuDNN deterministic, cuDNN autotuning, TF32 convolutions, TF32
    matrix products)."""
    cudnn = torch.backends.cudnn
    return (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark,
            cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)


def test_deterministic_sets_the_flags_and_the_cublas_workspace(backends):
    configure_backends(load_config(None, ["deterministic=true"]))
    assert settings() == (True, True, False, True, True)  # the autotuner may pick other kernels
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    configure_backends(load_config(None, []))
    assert settings() == (False, False, True, True, True)  # the defaults: autotuned, TF32


def test_the_default_is_not_set_again(backends, monkeypatch):
    """torch's setter imports its compiler stack (seconds of every process's start): it is called
    only to change the setting."""
    torch.use_deterministic_algorithms(False)

    def setter(mode: bool) -> None:
        raise AssertionError(f"use_deterministic_algorithms({mode}) with the setting already {mode}")

    with monkeypatch.context() as patched:  # undone before the fixture puts the setting back
        patched.setattr(torch, "use_deterministic_algorithms", setter)
        configure_backends(load_config(None, []))
    assert not torch.are_deterministic_algorithms_enabled()


def test_tf32_is_a_config_key_that_sets_both_backends(backends):
    cfg = load_config(None, ["tf32=false"])
    assert cfg.tf32 is False and to_dict(cfg)["tf32"] is False  # saved in the run's config.yaml
    configure_backends(cfg)
    assert settings() == (False, False, True, False, False)
    with pytest.raises(UserError, match="'tf32' expects bool"):
        load_config(None, ["tf32=sometimes"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_cuda_is_a_clear_error():
    with pytest.raises(UserError, match="no CUDA device is available; use --device cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_the_clip_loss_is_the_mean_of_the_frame_losses():
    """One form on every device (frames folded into the batch, which CUDA runs deterministically)."""
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(4, 5, 7, generator=g, dtype=torch.float64), torch.tensor([0, 3, 1, 4])
    per_frame = torch.stack([frame_loss(logits[:, :, t], labels) for t in range(logits.shape[2])])
    torch.testing.assert_close(clip_loss(logits, labels), per_frame.mean(), rtol=1e-12, atol=0)
