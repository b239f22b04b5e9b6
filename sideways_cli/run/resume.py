"""Resuming a run: whether a run directory's last checkpoint may continue with this config, and
what a checkpoint carries to continue exactly as an uninterrupted run would (:class:`RunState`).

A resumed run must end exactly where an uninterrupted one would, so it continues only with the
config it was trained with; the keys in MAY_DIFFER change neither the weights nor the losses.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from sideways_cli.config import Config, flat_dict, from_dict
from sideways_cli.engine.clock import register_layout
from sideways_cli.reports.tables import write_json
from sideways_cli.run.rundir import RunDir
from sideways_cli.support.errors import UserError

# how the work is spread, logged, tracked or chunked, never what is computed
MAY_DIFFER = ("data.num_workers", "train.log_every", "train.checkpoint_every", "train.fidelity_every",
              "eval.chunk",
              "parallel.replicas", "parallel.stages", "parallel.balance", "parallel.bp_schedule",
              "parallel.microbatches", "parallel.threads", "parallel.timeout_s", "parallel.backend",
              "log.tensorboard", "log.wandb", "log.wandb_project", "log.mlflow", "log.mlflow_experiment")


@dataclass
class RunState:
    """What a run carries from one start to the next besides the weights, optimizer and schedule:
    where the data stand, the counters behind the logged rates, the peaks, the best evaluation.

    In a checkpoint it is the ``resume`` entry, with the random streams, the device and (added by
    the learner) the rule's registers: the same keys as before this class existed, so old run
    directories resume.
    """

    data_position: tuple[int, int] = (0, 0)  # (epoch, position in it) of the next batch
    recent: list[float] = field(default_factory=list)  # the last train.log_every steps' losses
    # their global gradient norms before clipping (train.clip_grad_norm)
    grad_norms: list[float] = field(default_factory=list)
    frames_seen: int = 0
    updates: int = 0
    compute_s: float = 0.0  # in the rule, over every start
    wait_s: float = 0.0  # for data
    wall_s: float = 0.0  # on the run, over every start
    peak_mem_mb: float = 0.0  # the largest stage's, with stages
    stage_peak_mem_mb: list[float] | None = None  # each stage's, bottom first
    # the best evaluation so far by train.monitor, as a score (higher is better: val_mse's negated)
    best: float = -math.inf
    since_best: int = 0  # evaluations since then (train.early_stop_patience)
    kept_best: list[list] = field(default_factory=list)  # [step, score] of each best_<step>.pt kept
    unreadable: dict[str, str] = field(default_factory=dict)  # training videos that failed to decode
    # stopped by a signal after a step whose evaluation was due and not yet done
    pending_evaluation: bool = False

    @classmethod
    def from_checkpoint(cls, resume: dict[str, Any]) -> RunState:
        known = {name: resume[name] for name in cls.__dataclass_fields__ if name in resume}
        state = cls(**known)
        state.data_position = tuple(state.data_position)
        return state

    def to_checkpoint(self, device: torch.device) -> dict[str, Any]:
        state = asdict(self)
        if self.stage_peak_mem_mb is None:
            del state["stage_peak_mem_mb"]
        return {**state, "rng": rng_state(device), "device": device.type}

    def loss(self) -> float:
        """The mean of the recent batch losses: what the logs and the summary report."""
        return sum(self.recent) / len(self.recent)

    def add_peaks(self, per_stage: list[float]) -> None:
        """Fold this start's peak memory (one entry per stage, or the process's) into the run's."""
        if len(per_stage) > 1:
            before = self.stage_peak_mem_mb
            if before is not None and len(before) == len(per_stage):  # resumed with as many stages
                per_stage = [max(a, b) for a, b in zip(before, per_stage)]
            self.stage_peak_mem_mb = per_stage
        self.peak_mem_mb = max(self.peak_mem_mb, *per_stage)

    def peaks(self) -> dict[str, Any]:
        """The peak-memory entries of a log record or summary."""
        if self.stage_peak_mem_mb is None:
            return {"peak_mem_mb": self.peak_mem_mb}
        return {"peak_mem_mb": self.peak_mem_mb, "stage_peak_mem_mb": self.stage_peak_mem_mb}


@dataclass
class PreviousRun:
    checkpoint: dict[str, Any]  # on the CPU, one process's layout (a parallel job's merged)
    summary: dict[str, Any] | None  # set when the run is finished

    @property
    def step(self) -> int:
        return self.checkpoint["step"]

    @property
    def state(self) -> RunState:
        return RunState.from_checkpoint(self.checkpoint["resume"])


def find_previous_run(run: RunDir, cfg: Config, device: torch.device) -> PreviousRun | None:
    """The run in ``run`` to continue (or, finished, to report), None if there is none.

    Refuses, naming the keys, a run whose config differs in anything that changes results.
    """
    if not run.checkpoint().is_file():
        logged = run.logged_steps()
        if logged:  # starting again would replace its logs: the user decides
            raise UserError(f"{run.path} holds a run logged up to step {logged} but no "
                            f"{run.checkpoint()} to resume from; pass --restart to train it "
                            "from scratch, or give a new --out")
        return None
    ckpt = run.load_checkpoint()
    differing = config_differences(from_dict(ckpt["config"], str(run.checkpoint())), cfg)
    trained_on = ckpt.get("resume", {}).get("device", device.type)
    if trained_on != device.type:
        differing.append(f"device {trained_on} -> {device.type}")
    if differing:
        raise UserError(f"{run.path} holds a run with another config ({', '.join(differing)}); "
                        "rerun with the same config to resume it, pass a new --out, or --restart")
    if "summary" in ckpt:  # at train.steps, or where early stopping ended it
        if not run.is_finished():  # stopped between the final checkpoint and the summary
            write_json(run.summary, ckpt["summary"])
        return PreviousRun(ckpt, run.read_summary())
    if "resume" not in ckpt:
        raise UserError(f"{run.checkpoint()} holds no resume state (written by an older version); "
                        "pass --restart to train it again, or a new --out")
    return PreviousRun(ckpt, None)


def config_differences(saved: Config, current: Config) -> list[str]:
    """Dotted keys whose values differ, except MAY_DIFFER and ``device`` (compared once resolved)."""
    old, new = flat_dict(saved), flat_dict(current)
    return [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
            if key not in MAY_DIFFER and key != "device" and old.get(key) != new.get(key)]


def carried_rule_state(state: dict[str, Any], cfg: Config) -> dict[str, Any] | None:
    """The rule's registers from a checkpoint, for the executor ``cfg`` runs (its layout:
    ``clock.register_layout``; a P-stage run's shards reassemble into the same); None when
    there is nothing to carry. With ``between_clips: reset`` and ``update: clip`` nothing survives a
    batch, so a checkpoint in the other layout starts the next one alike."""
    layout = register_layout(cfg.sideways.update, cfg.sideways.chunk)
    if cfg.mode == "bp" or not state or layout in state:
        return state
    if cfg.sideways.between_clips == "reset" and cfg.sideways.update == "clip":
        return None
    chunk = "sideways.chunk=1" if "pipeline" in state else "the sideways.chunk (above 1) it ran with"
    raise UserError(f"this checkpoint holds the registers of a run with another sideways.chunk; "
                    f"with sideways.between_clips {cfg.sideways.between_clips!r} resume it with "
                    f"{chunk}")


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random stream the training process draws from (dropout, any torch.rand): the CPU's,
    Python's and, on CUDA, its own GPU's."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_tuples(state["python"]))
    cuda = state["cuda"]
    if cuda is not None and device.type == "cuda":
        if isinstance(cuda, list):  # written before each process kept its own GPU's stream
            cuda = cuda[device.index or 0]
        torch.cuda.set_rng_state(cuda.cpu(), device)


def _tuples(state: Any) -> Any:
    """Python's random state as random.setstate wants it (a loaded checkpoint may hold lists)."""
    return tuple(_tuples(item) for item in state) if isinstance(state, (list, tuple)) else state
