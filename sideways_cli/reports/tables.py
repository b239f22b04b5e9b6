"""Rendering results: rich tables for people, JSON and CSV for scripts."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from rich.table import Table

from sideways_cli.support.atomic import write_text_atomic


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A header and rows, written atomically."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# (column, summary key, format) of each task's validation metrics
_TASK_COLUMNS = {
    "classify": [("val clip top-1", "val_clip_top1", _pct), ("val video top-1", "val_video_top1", _pct)],
    "reconstruct": [("val PSNR (dB)", "val_psnr", "{:.2f}".format), ("val MSE", "val_mse", "{:.4f}".format)],
}
# the same of the EMA of the weights (train.ema_decay), where a run kept one
_EMA_COLUMNS = {"classify": [("EMA video top-1", "val_ema_video_top1", _pct)],
                "reconstruct": [("EMA PSNR (dB)", "val_ema_psnr", "{:.2f}".format)]}


def compare_table(summaries: list[dict[str, Any]], title: str = "BP vs Sideways",
                  settings: list[dict[str, Any]] | None = None, names: list[str] | None = None,
                  fidelity: list[tuple[float | None, float | None]] | None = None) -> Table:
    """One row per run. ``settings`` adds a column per compared key besides mode (swept, variant
    or --keys), ``names`` a run column, ``fidelity`` the mean whole-batch and per-tick fidelity
    columns; each only if given.
    The validation columns are the task's (accuracy or PSNR), and the EMA's where a run kept one."""
    keys = [k for k in (settings[0] if settings else {}) if k != "mode"]
    leaves = [key.rsplit(".", 1)[-1] for key in keys]  # frame_stride: narrow enough for a terminal
    task = summaries[0].get("task", "classify")
    ema = [column for column in _EMA_COLUMNS[task] if any(column[1] in s for s in summaries)]
    metrics = ([("train loss", "train_loss", "{:.3f}".format)] + _TASK_COLUMNS[task] + ema
               + [("frames/s", "frames_per_s", "{:.0f}".format),
                  ("peak mem (MiB)", "peak_mem_mb", "{:.0f}".format), ("wall (s)", "wall_s", "{:.0f}".format)])
    text_headers = (["run"] if names else []) + ["mode"]
    headers = text_headers + [leaf if leaves.count(leaf) == 1 else key for key, leaf in zip(keys, leaves)]
    headers += [name for name, _, _ in metrics] + (["fidelity", "tick fidelity"] if fidelity else [])
    table = Table(title=title)
    for j, header in enumerate(headers):
        table.add_column(header, justify="left" if j < len(text_headers) else "right")
    for i, s in enumerate(summaries):
        row = ([names[i]] if names else []) + [s["mode"]]
        row += [format_value(settings[i][key]) for key in keys] if settings else []
        row += [fmt(s[key]) if key in s else "" for _, key, fmt in metrics]  # (an EMA: not every run's)
        if fidelity:
            row += ["" if value is None else f"{value:.3f}" for value in fidelity[i]]
        table.add_row(*row)
    return table


def format_value(value: Any) -> str:
    """A config value as it would be typed after --set (true, not True)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def eval_table(result: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, _pct(value) if "top" in key or key.endswith("_acc") else str(value))
    return table


def mean_below_head(rows: list[dict], key: str = "cosine") -> float:
    """Mean ``key`` of the modules below the head: the head's gradient is exact under both rules,
    so counting it would only pull every run towards 1."""
    below = rows[:-1] or rows
    return sum(row[key] for row in below) / len(below)


def fidelity_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("#", justify="right")
    table.add_column("module")
    table.add_column("cosine(Sideways, BP)", justify="right")
    table.add_column("per-tick cosine", justify="right")
    for row in rows:
        table.add_row(str(row["index"]), row["name"], f"{row['cosine']:.5f}", f"{row['tick_cosine']:.5f}")
    return table


def stream_table(learners: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for name in ("learner", "frames used", "updates", "PSNR (dB)", "held-out PSNR (dB)", "wall (s)"):
        table.add_column(name, justify="left" if name == "learner" else "right")
    for r in learners:
        held_out = "-" if r["held_out_psnr"] is None else f"{r['held_out_psnr']:.2f}"
        table.add_row(r["mode"], f"{r['frames_used']}/{r['frames_arrived']}", str(r["updates"]),
                      f"{r['psnr']:.2f}", held_out, f"{r['wall_s']:.1f}")
    return table


def prediction_table(predictions: list, title: str) -> Table:
    """A row per video (``run.predict.Prediction``): its top labels with their probabilities."""
    table = Table(title=title)
    table.add_column("video", overflow="fold")
    table.add_column("top labels")
    for prediction in predictions:
        table.add_row(str(prediction.video),
                      ", ".join(f"{label} {_pct(p)}" for label, p in prediction.top))
    return table
