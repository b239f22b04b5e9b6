"""Process-wide settings a run asks for: the device, seeds, deterministic algorithms, bf16 autocast."""

from __future__ import annotations

import os
import random
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Callable

import torch

from sideways_cli.errors import UserError

Autocast = Callable[[], AbstractContextManager]


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


def set_deterministic(enabled: bool) -> None:
    """``deterministic: true``: the same numbers on every run of the same config and machine.

    Call before anything touches CUDA: cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it creates its
    handle, and without a fixed workspace its matrix products may differ from run to run.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    if enabled:
        torch.backends.cudnn.benchmark = False  # its autotuner may pick other kernels each run


def forward_autocast(device: torch.device, amp: bool) -> Autocast:
    """The context the forward passes run in: bf16 autocast with ``amp``, else nothing.

    bf16 rather than fp16: its fp32 exponent range needs no loss scaling, which Sideways could not
    apply anyway (its pseudo-gradients are accumulated tick by tick, not one backward of a loss).
    Weights, optimizer state and losses stay fp32.
    """
    if not amp:
        return nullcontext
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"amp (bf16 autocast) is not supported by {torch.cuda.get_device_name(device)}; "
                        "drop --amp or train on another device")
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"amp (bf16 autocast) is not available on device {device.type!r}; drop --amp")
    return partial(torch.autocast, device.type, dtype=torch.bfloat16)
