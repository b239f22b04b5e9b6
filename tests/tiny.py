"""What the tests share: tiny networks, random clips and tiny run configs, small enough that a whole
run takes seconds on 2 cores. Each is deterministic (its own seed), so every test that uses one
sees the same numbers."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from sideways_cli.data.catalog import resolve_dataset
from sideways_cli.data.decode import decord_module, torchcodec_decoders
from sideways_cli.models import RECONSTRUCTORS, FrameStack, build_model
from sideways_cli.run.build import resolve_config


def tiny_network(name: str = "c3d", k: int = 3, dtype: torch.dtype = torch.float64, seed: int = 0,
                 outputs: int | None = None, width: int = 4, **options: Any) -> FrameStack:
    """A zoo network of width 4 from ``seed``: 5 classes, or the 3 image channels for the
    autoencoder; ``options`` as ``build_model`` takes them (``depth``, ``levels``)."""
    torch.manual_seed(seed)
    if outputs is None:
        outputs = 3 if name in RECONSTRUCTORS else 5
    return build_model(name, outputs, width=width, temporal_kernel=k, **options).to(dtype)


def random_clips(count: int, frames: int, size: int = 8, dtype: torch.dtype = torch.float32,
                 batch: int = 2, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of normal-noise clips [batch, 3, frames, size, size], labels 1 and 3."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([1, 3] * (batch // 2) + [1] * (batch % 2))
    return [(torch.randn(batch, 3, frames, size, size, generator=g, dtype=dtype), labels)
            for _ in range(count)]


# a run of a few steps on the embedded dataset at its smallest: 10 training videos of 12 frames
TINY_RUN: dict[str, Any] = {
    "seed": 3,
    "model": {"name": "vgg", "temporal_kernel": 1, "width": 4},
    "data": {"clip_len": 6, "batch_size": 4, "num_workers": 0,
             "synthetic": {"train_per_class": 1, "val_per_class": 1, "num_frames": 12}},
    "train": {"steps": 3, "log_every": 1, "warmup_steps": 0},
    "eval": {"clips_per_video": 2, "batch_size": 8},
    "sideways": {"chunk": 1},
}


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, section by section (a value None removes the key)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        elif value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def tiny_run_config(root: Path, overrides: dict[str, Any] | None = None, name: str = "tiny.yaml",
                    generate: bool = False) -> Path:
    """TINY_RUN with its data under ``root`` and ``overrides`` merged in, written to root/name.
    ``generate``: make its dataset now, so that no run timed or killed later generates it."""
    # the data root first, so that an override's data section keeps it (and may name its own)
    cfg = merged(merged(TINY_RUN, {"data": {"root": str(root / "data")}}), overrides or {})
    path = root / name
    path.write_text(yaml.safe_dump(cfg))
    if generate:
        resolve_dataset(resolve_config(path).data, progress=False)
    return path


# decord is optional (no wheels for Apple Silicon or aarch64 Linux): what needs it is skipped there
NEEDS_DECORD = pytest.mark.skipif(decord_module() is None,
                                  reason="decord is not installed here; PyAV decodes without it")
# TorchCodec is an extra and needs the system's FFmpeg libraries
NEEDS_TORCHCODEC = pytest.mark.skipif(torchcodec_decoders() is None,
                                      reason="TorchCodec (the torchcodec extra, with FFmpeg's "
                                             "libraries) is not installed here")


def decoders(*names: str) -> list:
    """``names`` as parameters: torchcodec skipped without TorchCodec, decord and auto (decord
    first where installed: tests that name auto pin it to decord) without decord."""
    marks = {"torchcodec": NEEDS_TORCHCODEC, "decord": NEEDS_DECORD, "auto": NEEDS_DECORD}
    return [pytest.param(n, marks=marks[n]) if n in marks else n for n in names]
