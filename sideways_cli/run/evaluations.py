"""A run's evaluations and the checkpoint policy they drive: a row of ``evaluations.csv`` each;
``checkpoints/best.pt`` when ``train.monitor`` is the best so far (ties keep the earlier,
cheaper-to-reach one); with ``train.keep_best`` K > 1, ``checkpoints/best_<step>.pt`` for each of
the K best; and, with ``train.early_stop_patience``, when to stop for want of a better one.

What it carries from one start of the run to the next (the best score, the kept checkpoints, the
evaluations since the best) lives in the run's state (``resume.RunState``), so a resumed run
keeps, drops and stops exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from typing import Callable

from sideways_cli.config import Config
from sideways_cli.run.evaluate import PRIMARY_METRIC
from sideways_cli.run.resume import RunState
from sideways_cli.run.rundir import LineLog, RunDir, csv_line, trim_csv
from sideways_cli.support.atomic import write_text_atomic
from sideways_cli.support.errors import UserError

RUN_KEYS = ("step", "frames_seen", "wall_s", "train_loss")
TASK_METRICS = {"classify": ("val_clip_top1", "val_clip_top5", "val_video_top1", "val_video_top5",
                             "val_mean_class_acc"),
                "reconstruct": ("val_mse", "val_psnr")}
LOWER_IS_BETTER = ("val_mse", "val_ema_mse")


def ema_metric(metric: str) -> str:
    """What an evaluation metric of the raw weights is called for their average: val_ema_*."""
    return metric.replace("val_", "val_ema_", 1)


def metrics_of(cfg: Config) -> tuple[str, ...]:
    """The metrics every evaluation of ``cfg``'s run reports: its task's, and with
    ``train.ema_decay`` the same of the average of the weights."""
    raw = TASK_METRICS[cfg.task]
    return raw + tuple(map(ema_metric, raw)) if cfg.train.ema_decay else raw


def monitored(cfg: Config) -> str:
    """The metric ``train.monitor`` names (auto: the task's primary one); UserError naming the
    ones there are when the run reports no such metric."""
    if cfg.train.monitor == "auto":
        return PRIMARY_METRIC[cfg.task]
    if cfg.train.monitor not in metrics_of(cfg):
        ema = "" if cfg.train.ema_decay else " (val_ema_* with train.ema_decay)"
        raise UserError(f"config key 'train.monitor' must be auto or one of "
                        f"{', '.join(metrics_of(cfg))}{ema}, got {cfg.train.monitor!r}")
    return cfg.train.monitor


class Evaluations:
    def __init__(self, cfg: Config, run: RunDir, started: float, state: RunState,
                 kept_rows: int | None = None, writes: bool = True):
        """``state``: the run's, which this keeps the policy's memory in; ``kept_rows``: when a run
        resumes, the last step whose rows stand (the rows after it are dropped). ``writes``: False
        on every process of a job but global rank 0, which keep the same policy (and save alike:
        every process writes its shard) but write no row and remove no file."""
        self.run, self.state, self.writes, self.started = run, state, writes, started
        self.keys = RUN_KEYS + metrics_of(cfg)
        self.monitor = monitored(cfg)
        self.sign = -1.0 if self.monitor in LOWER_IS_BETTER else 1.0  # scores: higher is better
        self.keep, self.patience = cfg.train.keep_best, cfg.train.early_stop_patience
        if not writes:
            return
        if kept_rows is None:
            write_text_atomic(run.evaluations, csv_line(list(self.keys)) + "\n")
        else:
            trim_csv(run.evaluations, kept_rows, self.keys)

    def record(self, step: int, frames_seen: int, train_loss: float, val: dict[str, float],
               save: Callable[[str], None]) -> None:
        """The evaluation at ``step``: its row, and the checkpoints it earns (``save(which)``
        writes checkpoints/``which``.pt)."""
        row = {"step": step, "frames_seen": frames_seen, "train_loss": train_loss,
               "wall_s": time.perf_counter() - self.started, **val}
        if self.writes:
            with LineLog(self.run.evaluations) as log:
                log.append(csv_line([row[key] for key in self.keys]))
        state, score = self.state, self.sign * val[self.monitor]
        if math.isnan(score):  # a diverged run's evaluation is never the best
            score = -math.inf
        if score > state.best:
            state.best, state.since_best = score, 0
            save("best")
        else:
            state.since_best += 1
        if self.keep > 1:
            self._keep(step, score, save)

    def _keep(self, step: int, score: float, save: Callable[[str], None]) -> None:
        """best_<step>.pt while ``score`` is among the K best, the one it pushes out removed."""
        kept = self.state.kept_best
        # ranked by score, the earlier first among equals: as best.pt keeps the earlier
        ranked = sorted(kept + [[step, score]], key=lambda entry: (-entry[1], entry[0]))
        if [step, score] not in ranked[:self.keep]:
            return
        save(f"best_{step}")
        for dropped, _ in ranked[self.keep:]:
            if self.writes:
                self.run.drop_checkpoint(f"best_{dropped}")
        self.state.kept_best = ranked[:self.keep]

    def exhausted(self) -> bool:
        """Whether ``train.early_stop_patience`` evaluations in a row have not bettered the best."""
        return bool(self.patience) and self.state.since_best >= self.patience
