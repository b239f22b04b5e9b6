"""Live experiment tracking: a run's numbers, as they are made, in TensorBoard (``log.tensorboard``),
Weights & Biases (``log.wandb``) and MLflow (``log.mlflow``).

Only global rank 0 tracks. A resumed run continues the same curves. TensorBoard is told to purge
what a killed start logged after the step the run resumes from, as ``metrics.jsonl`` is trimmed
(its readers drop those points). W&B and MLflow continue the same tracked run, whose id
``RUN_DIR/tracking.json`` keeps, and keep the points they already hold: a step done again gives
the same numbers (the resume is exact), so it is not logged twice.

A tracker that fails (not installed, offline, a full disk) costs one warning line and is dropped;
the training goes on without it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable

import yaml

from sideways_cli.config import Config, flat_dict, to_dict
from sideways_cli.reports.tables import write_json
from sideways_cli.run.evaluate import PRIMARY_METRIC
from sideways_cli.run.rundir import RunDir


def training_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The tracked scalars of a ``metrics.jsonl`` record, by tag."""
    scalars = {"train/loss": record["loss"], "train/lr": record["lr"],
               "train/frames_per_s": record["frames_per_s"],
               "train/data_wait_share": record["data_wait_share"],
               "memory/peak_mb": record["peak_mem_mb"]}
    if "grad_norm" in record:  # train.clip_grad_norm's, before clipping
        scalars["train/grad_norm"] = record["grad_norm"]
    for stage, peak in enumerate(record.get("stage_peak_mem_mb") or []):
        scalars[f"memory/stage{stage}_peak_mb"] = peak
    return scalars


def evaluation_scalars(val: dict[str, float]) -> dict[str, float]:
    """An evaluation's metrics (val_clip_top1, ...) by tag (val/clip_top1, ...)."""
    return {"val/" + name.removeprefix("val_"): value for name, value in val.items()}


def fidelity_scalars(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per-module gradient fidelity (``engine.fidelity`` rows) by tag: fidelity/<index>_<name>."""
    return {f"fidelity/{row['index']}_{row['name']}": row["cosine"] for row in rows}


class Trackers:
    """The trackers ``cfg.log`` turns on, for one start of a run.

    ``resumed_from``: the last step whose logged points stand (0 for a fresh run: a start that
    died before its first checkpoint leaves none); what earlier starts logged after it is purged.
    ``writes``: False on every process of a job but global rank 0, which then tracks nothing."""

    def __init__(self, cfg: Config, run: RunDir, resumed_from: int, writes: bool = True):
        self.live: list[Any] = []
        if not writes:
            return
        starts = {"tensorboard": lambda: TensorBoard(cfg, run, resumed_from),
                  "wandb": lambda: WandB(cfg, run), "mlflow": lambda: MLflow(cfg, run)}
        for name, start in starts.items():
            if getattr(cfg.log, name):
                try:
                    self.live.append(start())
                except Exception as exc:  # noqa: BLE001 - whatever a tracker raises, training goes on
                    self._drop(name, exc)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._each(lambda tracker: tracker.scalars(step, values))

    def flush(self) -> None:
        """Make what was logged durable: at a checkpoint, so a kill loses nothing a resume keeps."""
        self._each(lambda tracker: tracker.flush())

    def close(self, outcome: str = "finished") -> None:
        """End every tracker's run as ``outcome``: finished, stopped (to be resumed) or failed."""
        self._each(lambda tracker: tracker.close(outcome))
        self.live = []

    def _each(self, call: Callable[[Any], None]) -> None:
        for tracker in list(self.live):
            try:
                call(tracker)
            except Exception as exc:  # noqa: BLE001
                self.live.remove(tracker)
                self._drop(tracker.name, exc)

    def _drop(self, name: str, exc: Exception) -> None:
        if isinstance(exc, ImportError):
            _warn(f"warning: log.{name} is on but {INSTALL[name][0]} is not installed "
                      f"({INSTALL[name][1]}); training goes on without it")
        else:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _warn(f"warning: log.{name} stopped ({reason}); training goes on without it")


# the package each tracker needs and how to get it
INSTALL = {"tensorboard": ("tensorboard", "pip install tensorboard"),
           "wandb": ("wandb", "pip install 'sideways-cli[wandb]'"),
           "mlflow": ("mlflow", "pip install 'sideways-cli[mlflow]'")}


def _warn(line: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(line, markup=False)


class TensorBoard:
    """Event files in ``RUN_DIR/tensorboard``: ``tensorboard --logdir RUN_DIR`` (or a folder of
    runs) shows them while the run trains."""

    name = "tensorboard"

    def __init__(self, cfg: Config, run: RunDir, resumed_from: int):
        from torch.utils.tensorboard import SummaryWriter  # ImportError without tensorboard

        fresh = not any(run.tensorboard.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(str(run.tensorboard), purge_step=resumed_from + 1, flush_secs=10)
        if fresh:
            self._describe(cfg)

    def _describe(self, cfg: Config) -> None:
        """The config: every key as an hparam (TensorBoard's HPARAMS tab, against the primary
        metric) and whole as text."""
        from torch.utils.tensorboard.summary import hparams

        params = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                  for key, value in flat_dict(cfg).items()}
        primary = "val/" + PRIMARY_METRIC[cfg.task].removeprefix("val_")
        for summary in hparams(params, {primary: 0.0}):
            self.writer.file_writer.add_summary(summary)
        text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
        self.writer.add_text("config", "```yaml\n" + text + "```", 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, outcome: str) -> None:
        self.writer.close()


def _tracked_ids(run: RunDir) -> dict[str, str]:
    """The ids under which the trackers track this run (``tracking.json``); {} before the first."""
    try:
        ids = json.loads(run.tracking.read_text())
    except (OSError, json.JSONDecodeError):  # none yet, or damaged: the run is tracked anew
        return {}
    return ids if isinstance(ids, dict) else {}


def _keep_tracked_id(run: RunDir, name: str, run_id: str) -> None:
    ids = _tracked_ids(run)
    if ids.get(name) != run_id:
        write_json(run.tracking, {**ids, name: run_id})


class WandB:
    """A W&B run named after the run directory, with the config; ``WANDB_MODE=offline`` (and every
    other setting of W&B's own) honoured. A resumed run continues the same W&B run, which drops
    steps it already holds."""

    name = "wandb"

    def __init__(self, cfg: Config, run: RunDir):
        import wandb  # ImportError without it

        self.run = wandb.init(project=cfg.log.wandb_project, name=run.path.name,
                              id=_tracked_ids(run).get(self.name), resume="allow",
                              dir=str(run.path), config=to_dict(cfg))
        _keep_tracked_id(run, self.name, self.run.id)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def flush(self) -> None:
        """W&B writes as it goes."""

    def close(self, outcome: str) -> None:
        self.run.finish(exit_code=0 if outcome == "finished" else 1)


def local_mlflow_store(run: RunDir) -> str:
    """The tracking URI of the MLflow store kept in the run directory, where no server is named."""
    return f"sqlite:///{(run.path / 'mlflow.db').resolve()}"


class MLflow:
    """An MLflow run in experiment ``log.mlflow_experiment`` of the tracking server
    ``MLFLOW_TRACKING_URI`` names, else of a store in ``RUN_DIR/mlflow.db`` (offline); the config
    as its parameters. A resumed run continues the same MLflow run, adding only the steps past the
    ones it holds."""

    name = "mlflow"

    def __init__(self, cfg: Config, run: RunDir):
        from mlflow.tracking import MlflowClient  # ImportError without it

        uri = os.environ.get("MLFLOW_TRACKING_URI") or local_mlflow_store(run)
        for talkative in ("mlflow", "alembic"):  # creating a store's tables is no news to a user
            logging.getLogger(talkative).setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = _tracked_ids(run).get(self.name)
        self.held: dict[str, int] = {}  # per metric, the last step the MLflow run holds
        if self.run_id is None:
            experiment = self.client.get_experiment_by_name(cfg.log.mlflow_experiment)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(cfg.log.mlflow_experiment))
            self.run_id = self.client.create_run(experiment_id, run_name=run.path.name).info.run_id
            self._parameters(cfg)
            _keep_tracked_id(run, self.name, self.run_id)
            self.resumed = False
        else:
            self.client.update_run(self.run_id, status="RUNNING")
            self.resumed = True

    def _parameters(self, cfg: Config) -> None:
        from mlflow.entities import Param

        params = [Param(key, str(value)) for key, value in flat_dict(cfg).items()]
        for start in range(0, len(params), 100):  # MLflow takes 100 parameters a call
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def _held(self, key: str) -> int:
        if key not in self.held:
            history = self.client.get_metric_history(self.run_id, key) if self.resumed else []
            self.held[key] = max((metric.step for metric in history), default=-1)
        return self.held[key]

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        new = [Metric(key, float(value), now, step) for key, value in values.items()
               if step > self._held(key)]
        if new:
            self.client.log_batch(self.run_id, metrics=new)
        self.held.update({metric.key: step for metric in new})

    def flush(self) -> None:
        """MLflow writes as it goes."""

    def close(self, outcome: str) -> None:
        status = {"finished": "FINISHED", "stopped": "KILLED"}.get(outcome, "FAILED")
        self.client.set_terminated(self.run_id, status)

