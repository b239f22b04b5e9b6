"""Process-wide settings a run asks for: the device, seeds, the CUDA backends' numerics (deterministic
algorithms, cuDNN autotuning, TF32), bf16 autocast; and moving batches onto the device."""

from __future__ import annotations

import os
import random
import time
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Callable, Protocol

import torch

from sideways_cli.support.errors import UserError

Autocast = Callable[[], AbstractContextManager]  # the context forward passes run in (bf16 AMP)


class BackendSettings(Protocol):
    """The keys of a run's config (``config.Config``) that set the backends' numerics."""

    deterministic: bool
    tf32: bool


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no CUDA device is available; "
                        "use --device cpu (or auto)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def configure_backends(cfg: BackendSettings) -> None:
    """Every process-wide numerics setting ``cfg`` asks for, in one place: deterministic
    algorithms, cuDNN autotuning, TF32. Call first, before anything touches CUDA (see
    :func:`set_deterministic`); on a CPU only deterministic algorithms apply."""
    set_deterministic(cfg.deterministic)
    set_tf32(cfg.tf32)


def set_deterministic(enabled: bool) -> None:
    """``deterministic: true``: the same numbers on every run of the same config and machine.

    Call before anything touches CUDA: cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it creates its
    handle, and without a fixed workspace its matrix products may differ from run to run.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.are_deterministic_algorithms_enabled() != enabled:
        # only on a change: torch's setter imports its compiler stack (torch._inductor, about
        # 2 s of CPU), which every process of every command would pay to set the default again
        torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    # cuDNN's autotuner times the candidate kernels of each new shape and keeps the fastest, which
    # may be another one on the next run: not with deterministic. Otherwise on: the engine's shapes
    # repeat batch after batch, so the timing of the first batches is paid back many times over
    torch.backends.cudnn.benchmark = not enabled


def set_tf32(enabled: bool) -> None:
    """``tf32``: float32 matrix products and convolutions on Ampere and later GPUs in TF32 (a
    10-bit mantissa, ~1e-3 relative), several times faster; False keeps them exact float32.
    float64 (``precision: float64``) and bf16 autocast are not affected."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def to_device(tensor: torch.Tensor, device: torch.device,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` (a batch on the host) on ``device`` in ``dtype``. Onto a GPU the copy is queued
    without waiting for it (from pinned memory it overlaps the kernels already queued; the kernels
    that read it are queued after it on the same stream, so they see it whole)."""
    return tensor.to(device, dtype, non_blocking=device.type == "cuda")


def clock(device: torch.device) -> float:
    """Wall time once ``device`` has finished what was queued: CUDA kernels run asynchronously,
    so the clock alone would time their launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def forward_autocast(device: torch.device, amp: bool) -> Autocast:
    """The context the forward passes run in: bf16 autocast with ``amp``, else nothing.

    bf16 rather than fp16: its fp32 exponent range needs no loss scaling, which Sideways could not
    apply anyway (its pseudo-gradients are accumulated tick by tick, not one backward of a loss).
    Weights, optimizer state and losses stay fp32.
    """
    if not amp:
        return nullcontext
    # a GPU without bf16 units (V100, T4) emulates it, slower than fp32: AMP would only cost time
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError(f"amp (bf16 autocast) needs native bf16, which "
                        f"{torch.cuda.get_device_name(device)} lacks (emulated, bf16 is slower than "
                        "float32); drop --amp, or train on an Ampere or later GPU")
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"amp (bf16 autocast) is not available on device {device.type!r}; drop --amp")
    return partial(torch.autocast, device.type, dtype=torch.bfloat16)
