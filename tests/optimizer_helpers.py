"""The optimizers the config offers, built as a run builds them, for the engine's equality tests."""

from __future__ import annotations

from typing import Callable

from torch import nn

from sideways_cli.config import TrainConfig
from sideways_cli.run.build import make_optimizer, make_lr_schedule

STEPS = 4
# train.optimizer's choices (SGD with momentum is Nesterov's), each with warm-up and cosine decay
OPTIMIZERS = {
    "sgd-nesterov": TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, warmup_steps=2, steps=STEPS),
    "sgd": TrainConfig(optimizer="sgd", lr=0.05, momentum=0.0, warmup_steps=2, steps=STEPS),
    "adamw": TrainConfig(optimizer="adamw", lr=0.01, warmup_steps=2, steps=STEPS),
}


def stepper(name: str, module: nn.Module) -> tuple[Callable[[], None], Callable[[], None]]:
    """(apply_update for a rule, the schedule's step after each batch) of optimizer ``name``."""
    cfg = OPTIMIZERS[name]
    optimizer = make_optimizer(cfg, module)
    schedule = make_lr_schedule(cfg, optimizer)

    def apply_update() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return apply_update, schedule.step
