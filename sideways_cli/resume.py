"""Run directories that resume: whether a run may continue from its ``checkpoints/last.pt``, the
process state that checkpoint carries besides the weights, and trimming the logs back to it.

A resumed run must end exactly where an uninterrupted one would, so it continues only with the
config it was trained with; the keys below change neither the weights nor the losses.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sideways_cli.atomic import replace_atomically, write_text_atomic
from sideways_cli.config import Config, flat_dict, from_dict
from sideways_cli.errors import UserError

# how the work is spread or logged, never what is computed
MAY_DIFFER = ("data.num_workers", "train.log_every", "train.checkpoint_every", "eval.chunk", "parallel.stages",
              "parallel.balance", "parallel.schedule", "parallel.microbatches", "parallel.threads",
              "parallel.timeout_s", "parallel.backend")
# what a run directory holds about its training; --restart removes exactly these
RUN_FILES = ("checkpoints/last.pt", "checkpoints/best.pt", "summary.json", "summary.csv", "metrics.jsonl")


def last_checkpoint(out_dir: Path) -> Path:
    return out_dir / "checkpoints" / "last.pt"


@dataclass
class PreviousRun:
    checkpoint: dict[str, Any]  # tensors already on the run's device
    summary: dict[str, Any] | None  # set when the run is finished

    @property
    def step(self) -> int:
        return self.checkpoint["step"]


def discard_run(out_dir: Path) -> None:
    """--restart: forget the run's state and logs (config.yaml is rewritten anyway)."""
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for figure in out_dir.glob("confusion_*.png"):  # made from the discarded weights
        figure.unlink()


def find_previous_run(out_dir: Path, cfg: Config, device: torch.device) -> PreviousRun | None:
    """The run in ``out_dir`` to continue (or, finished, to report), None if there is none.

    Refuses, naming the keys, a run whose config differs in anything that changes results.
    """
    path = last_checkpoint(out_dir)
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise UserError(f"{path} cannot be read ({type(exc).__name__}); pass --restart to train "
                        f"{out_dir} from scratch, or a new --out") from None
    differing = config_differences(from_dict(ckpt["config"], str(path)), cfg)
    trained_on = ckpt.get("resume", {}).get("device", device.type)
    if trained_on != device.type:
        differing.append(f"device {trained_on} -> {device.type}")
    if differing:
        raise UserError(f"{out_dir} holds a run with another config ({', '.join(differing)}); "
                        "rerun with the same config to resume it, pass a new --out, or --restart")
    summary_path = out_dir / "summary.json"
    if ckpt["step"] >= cfg.train.steps and "summary" in ckpt:
        if not summary_path.is_file():  # stopped between the final checkpoint and the summary
            write_text_atomic(summary_path, json.dumps(ckpt["summary"], indent=2) + "\n")
        return PreviousRun(ckpt, json.loads(summary_path.read_text()))
    if "resume" not in ckpt:
        raise UserError(f"{path} holds no resume state (written by an older version); pass "
                        "--restart to train it again, or a new --out")
    return PreviousRun(ckpt, None)


def config_differences(saved: Config, current: Config) -> list[str]:
    """Dotted keys whose values differ, except MAY_DIFFER and ``device`` (compared once resolved)."""
    old, new = flat_dict(saved), flat_dict(current)
    return [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
            if key not in MAY_DIFFER and key != "device" and old.get(key) != new.get(key)]


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random stream the training process draws from (dropout, any torch.rand)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}


def restore_rng(state: dict[str, Any]) -> None:
    # set_rng_state wants CPU byte tensors; the checkpoint was mapped onto the run's device
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


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
    rows: list[list[str]] = []
    if path.is_file():
        with path.open(newline="") as f:
            rows = [row for row in csv.reader(f)][1:]
    kept = [row for row in rows if len(row) == len(header) and row[0].isdigit() and int(row[0]) <= step]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            csv.writer(f).writerows([list(header), *kept])

    replace_atomically(path, write)
