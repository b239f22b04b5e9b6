"""Rendering results: rich tables for people, JSON for scripts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# (column, summary key, format) of each task's validation metrics
_TASK_COLUMNS = {
    "classify": [("val clip top-1", "val_clip_top1", _pct), ("val video top-1", "val_video_top1", _pct)],
    "reconstruct": [("val PSNR (dB)", "val_psnr", "{:.2f}".format), ("val MSE", "val_mse", "{:.4f}".format)],
}


def compare_table(summaries: list[dict[str, Any]], title: str = "BP vs Sideways") -> Table:
    task_columns = _TASK_COLUMNS[summaries[0].get("task", "classify")]
    columns = ([("train loss", "train_loss", "{:.3f}".format)] + task_columns
               + [("frames/s", "frames_per_s", "{:.0f}".format),
                  ("peak mem (MiB)", "peak_mem_mb", "{:.0f}".format), ("wall (s)", "wall_s", "{:.0f}".format)])
    table = Table(title=title)
    table.add_column("mode")
    for name, _, _ in columns:
        table.add_column(name, justify="right")
    for s in summaries:
        table.add_row(s["mode"], *(fmt(s[key]) for _, key, fmt in columns))
    return table


def eval_table(result: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, _pct(value) if "top" in key or key.endswith("_acc") else str(value))
    return table


def fidelity_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("#", justify="right")
    table.add_column("module")
    table.add_column("cosine(Sideways, BP)", justify="right")
    for row in rows:
        table.add_row(str(row["index"]), row["name"], f"{row['cosine']:.5f}")
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
