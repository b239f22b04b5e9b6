"""A run directory: where each file of a run lives, and reading a run back.

    RUN_DIR/
      config.yaml                  the resolved config, written when training starts
      metrics.jsonl                a record every train.log_every steps (loss, lr, frames/s, memory)
      evaluations.csv                  a row per evaluation
      summary.json                 the final summary, written last: the run is finished
      checkpoints/last.pt          resumable (weights, optimizer, schedule, the rule's registers,
                                   the run's state), every train.checkpoint_every steps
      checkpoints/best.pt          the best evaluation's weights (by train.monitor)
      checkpoints/best_<step>.pt   with train.keep_best K > 1: each of the K best evaluations'
      checkpoints/shards/          a parallel job's checkpoints: every process writes its own
                                   shard there, and last.pt / best.pt name the ones they are made of
      launch.yaml                  the config the stages of a self-launched staged run read
      confusion_<split>.png        `sideways eval`'s confusion matrix
      .lock                        held by the process writing the run (``run/lock.py``)

Every file is written atomically (a temporary file renamed into place), or appended a whole line
at a time and read up to its last complete line, so neither a kill nor a reader during training
ever sees half of one. ``sideways train``, ``eval``, ``compare --runs``, ``fidelity --run`` and
resuming all find a run's files through :class:`RunDir`.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import yaml

from sideways_cli.config import Config, flat_dict, from_dict, save_config
from sideways_cli.parallel.resharding import merge_shards, stage_rules_merger, with_learner
from sideways_cli.support.atomic import (WriteError, complete_lines, replace_atomically, write_text_atomic,
                                         writing)
from sideways_cli.support.errors import UserError
from sideways_cli.support.safe_load import UnsafeFile, load_tensors

CHECKPOINTS = ("last", "best")
_START_AGAIN = "to train {} again from scratch, run 'sideways train' on it with --restart"
_SHARD = re.compile(r"^(?P<which>\w+)-step(?P<step>\d+)-rank(?P<rank>\d+)\.pt$")


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))  # a str from a stage's set-up message

    @property
    def config_yaml(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def evaluations(self) -> Path:
        """evaluations.csv; in a run directory written before it had that name, its summary.csv,
        which a resumed run goes on appending to."""
        path = self.path / "evaluations.csv"
        legacy = self.path / "summary.csv"
        return legacy if legacy.is_file() and not path.exists() else path

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def fidelity(self) -> Path:
        """fidelity.jsonl: each module's gradient fidelity every train.fidelity_every steps."""
        return self.path / "fidelity.jsonl"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard's event files (log.tensorboard)."""
        return self.path / "tensorboard"

    @property
    def tracking(self) -> Path:
        """tracking.json: the ids W&B and MLflow track the run under, to continue them on resume."""
        return self.path / "tracking.json"

    @property
    def launch_config(self) -> Path:
        return self.path / "launch.yaml"

    def checkpoint(self, which: str = "last") -> Path:
        return self.path / "checkpoints" / f"{which}.pt"

    @property
    def shards(self) -> Path:
        return self.path / "checkpoints" / "shards"

    def shard(self, which: str, step: int, rank: int) -> Path:
        """Process ``rank``'s part of checkpoint ``which`` at ``step`` in a parallel job."""
        return self.shards / f"{which}-step{step:08d}-rank{rank}.pt"

    def drop_shards_before(self, which: str, step: int) -> None:
        """Remove checkpoint ``which``'s shards of steps before ``step``: once ``which``.pt names
        the new ones nothing reads them. (Later steps' may be being written already.)"""
        for path in self.shards.glob(f"{which}-step*"):
            match = _SHARD.match(path.name.removesuffix(".tmp"))
            if match and match["which"] == which and int(match["step"]) < step:
                path.unlink(missing_ok=True)

    def drop_checkpoint(self, which: str) -> None:
        """Remove checkpoint ``which`` and its shards (a best_<step>.pt pushed out of the best)."""
        self.checkpoint(which).unlink(missing_ok=True)
        self.drop_shards_before(which, 2**63)

    def remove_temporaries(self) -> None:
        """The ``.tmp`` files a killed write left (only while holding the run's lock: then no
        other process is writing one)."""
        for tmp in (*self.path.glob("*.tmp"), *self.path.glob("checkpoints/*.tmp"),
                    *self.shards.glob("*.tmp")):
            tmp.unlink(missing_ok=True)

    def logged_steps(self) -> int:
        """The last step metrics.jsonl or evaluations.csv records (0: none)."""
        steps = [record["step"] for record in read_jsonl(self.metrics)] if self.metrics.is_file() else []
        if self.evaluations.is_file():
            steps += [int(row[0]) for row in csv.reader(complete_lines(self.evaluations))
                      if row and row[0].isdigit()]
        return max(steps, default=0)

    def confusion(self, split: str) -> Path:
        return self.path / f"confusion_{split}.png"

    def discard(self) -> None:
        """--restart: forget the run's state and logs (config.yaml is rewritten anyway), and the
        figures made from the discarded weights."""
        kept = self.path.glob("checkpoints/best_*.pt")  # train.keep_best's
        for path in (*map(self.checkpoint, CHECKPOINTS), *kept, self.summary, self.evaluations,
                     self.metrics, self.fidelity, self.tracking):  # tracked anew when restarted
            path.unlink(missing_ok=True)
        shutil.rmtree(self.tensorboard, ignore_errors=True)
        for shard in self.shards.glob("*"):
            shard.unlink()
        for figure in self.path.glob("confusion_*.png"):
            figure.unlink()

    def write_config(self, cfg: Config) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.config_yaml)

    def read_config(self) -> Config:
        if not self.config_yaml.is_file():
            raise UserError(f"{self.path} has no config.yaml; it was not written by 'sideways train'")
        return from_dict(yaml.safe_load(self.config_yaml.read_text()) or {}, str(self.config_yaml))

    def load_checkpoint(self, which: str = "last") -> dict[str, Any]:
        """A checkpoint of this run, on the CPU, as one process would have written it (a parallel
        job's shards merged: ``resharding.py``); UserError naming the file and what to do when it
        is not there or cannot be read. Nothing in it can run code: only tensors and plain data
        are unpickled."""
        path = self.checkpoint(which)
        if which == "best" and not path.is_file() and self.checkpoint().is_file():
            raise UserError(f"{path} not found: the run has not evaluated yet (best.pt is written "
                            "at its first evaluation); use its last checkpoint")
        if not path.is_file():
            raise UserError(f"{path} not found; train first with 'sideways train --out {self.path}'")
        ckpt = self._read(path)
        if "shards" in ckpt:
            shards = [self._read(self.shards / name) for name in ckpt["shards"]]
            merge = stage_rules_merger(ckpt["config"]["mode"], ckpt["config"]["sideways"]["update"],
                                       ckpt["config"]["sideways"]["chunk"])
            ckpt = with_learner(ckpt, merge_shards(shards, ckpt["topology"]["replicas"],
                                                   ckpt["topology"]["stages"], merge))
        return ckpt

    def _read(self, path: Path) -> dict[str, Any]:
        if not path.is_file():
            raise UserError(f"{path} not found, though {self.checkpoint()} or "
                            f"{self.checkpoint('best')} names it; {_START_AGAIN.format(self.path)}")
        try:
            return load_tensors(path)
        except UnsafeFile as exc:
            raise UserError(f"{exc}; use a run directory written by 'sideways train' (or "
                            f"{_START_AGAIN.format(self.path)})") from None
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
            raise UserError(f"{path} cannot be read ({type(exc).__name__}): it is damaged or not "
                            f"a checkpoint; {_START_AGAIN.format(self.path)}") from None

    def is_finished(self) -> bool:
        return self.summary.is_file()

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.summary.read_text())

    def read_finished(self, name: str | None = None) -> FinishedRun:
        """What a finished run's files hold: resolved config, summary, both curves; ``name``
        (default: the folder's) is how tables and plots call it."""
        if not self.path.is_dir():
            raise UserError(f"{self.path} is not a directory; give a run directory written by "
                            "'sideways train' or 'sideways compare'")
        if not self.is_finished():
            raise UserError(f"{self.path} has no summary.json, so its run did not finish; finish it "
                            f"with 'sideways train CONFIG --out {self.path}' or leave it out")
        metrics = read_jsonl(self.metrics) if self.metrics.is_file() else []
        evaluations = []
        if self.evaluations.is_file():
            rows = csv.DictReader(complete_lines(self.evaluations))
            try:
                evaluations = [{k: float(v) for k, v in row.items()} for row in rows]
            except (TypeError, ValueError):
                raise UserError(f"{self.evaluations} has a malformed row; it was not written by "
                                "'sideways train' alone") from None
        fidelity = read_jsonl(self.fidelity) if self.fidelity.is_file() else []
        return FinishedRun(name or self.path.name, self.path, flat_dict(self.read_config()),
                           self.read_summary(), metrics, evaluations, fidelity)


@dataclass
class FinishedRun:
    """A finished run as its directory holds it."""

    name: str
    run_dir: Path
    config: dict[str, Any]  # resolved config, dotted keys
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]  # metrics.jsonl: the training-loss curve
    evaluations: list[dict[str, float]]  # evaluations.csv: the validation curve
    # fidelity.jsonl (train.fidelity_every): each module's gradient fidelity as training went
    fidelity_curve: list[dict[str, Any]] = field(default_factory=list)


def save_checkpoint(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename: neither a kill nor a full disk ever leaves a
    half-written checkpoint, and the previous one stands until the new one is whole."""
    replace_atomically(path, lambda f: torch.save(obj, f))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log, up to its last complete line; UserError for a line that
    is not a record."""
    records = []
    for n, line in enumerate(complete_lines(path), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            raise UserError(f"{path}:{n} is not a JSON record; it was not written by "
                            "'sideways train' alone") from None
    return records


def csv_line(values: list[Any]) -> str:
    text = io.StringIO()
    csv.writer(text, lineterminator="").writerow(values)
    return text.getvalue()


class LineLog:
    """A log written a whole line at a time (metrics.jsonl, evaluations.csv), so that a reader takes
    every line up to the last complete one; a failed write (a full disk) is a WriteError naming
    the file."""

    def __init__(self, path: Path, fresh: bool = False):
        self.path = path
        with writing(path):
            self.file: TextIO | None = path.open("w" if fresh else "a")

    def append(self, line: str) -> None:
        with writing(self.path):
            self.file.write(line + "\n")
            self.file.flush()

    def close(self, failing: bool = False) -> None:
        file, self.file = self.file, None
        try:
            file.close()
        except OSError as exc:  # what a failed write left in the buffer
            if not failing:
                raise WriteError(self.path, exc) from None

    def __enter__(self) -> LineLog:
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close(failing=kind is not None)


def trim_jsonl(path: Path, step: int) -> None:
    """Drop the records past ``step`` (and a line cut short by a kill)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    write_text_atomic(path, "".join(kept))


def trim_csv(path: Path, step: int, header: tuple[str, ...]) -> None:
    """Keep the header and the rows of steps up to ``step``; write the header if the file is gone."""
    rows = list(csv.reader(complete_lines(path)))[1:] if path.is_file() else []
    kept = [row for row in rows if len(row) == len(header) and row[0].isdigit() and int(row[0]) <= step]
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([list(header), *kept])
    write_text_atomic(path, text.getvalue())
