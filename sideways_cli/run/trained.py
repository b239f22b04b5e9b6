"""A run directory's checkpoint as a network ready to use, on the device and with the numerics
the run was trained with: what ``sideways eval``, ``sideways predict`` and the Python API load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sideways_cli.config import Config, from_dict
from sideways_cli.models.stack import FrameStack
from sideways_cli.run.build import build_network
from sideways_cli.run.rundir import RunDir
from sideways_cli.support.errors import UserError
from sideways_cli.support.runtime import Autocast, configure_backends, forward_autocast, resolve_device


@dataclass
class TrainedRun:
    run: RunDir
    checkpoint: str  # last | best | best_<step>
    step: int
    cfg: Config  # the run's, as its checkpoint holds it
    classes: list[str]
    model: FrameStack  # on ``device``
    device: torch.device
    autocast: Autocast


def load_trained(run_dir: Path | str, checkpoint: str = "last", device: str | None = None,
                 ema: bool = False) -> TrainedRun:
    """Checkpoint ``checkpoint`` of ``run_dir`` (read safely: tensors and plain data only), its
    network built from the run's config with the checkpoint's weights (``ema``: their moving
    average, train.ema_decay), on the run's device (or ``device``)."""
    run = RunDir(Path(run_dir))
    ckpt = run.load_checkpoint(checkpoint)
    cfg = from_dict(ckpt["config"], str(run.checkpoint(checkpoint)))
    if device is not None:
        cfg.device = device
    configure_backends(cfg)  # used as the run was trained
    on = resolve_device(cfg.device)
    classes = list(ckpt["classes"])
    model = build_network(cfg, len(classes), pretrained=False)
    if ema and "ema" not in ckpt:
        raise UserError(f"{run.checkpoint(checkpoint)} holds no moving average of the weights (the "
                        "run was trained without train.ema_decay); drop --ema")
    model.load_state_dict(ckpt["ema" if ema else "model"])
    return TrainedRun(run, checkpoint, int(ckpt["step"]), cfg, classes, model.to(on), on,
                      forward_autocast(on, cfg.amp))
