"""Rendering results: rich tables for people, JSON for scripts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from sideways_cli.atomic import write_text_atomic


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def compare_table(summaries: list[dict[str, Any]], title: str = "BP vs Sideways") -> Table:
    table = Table(title=title)
    for name, justify in [("mode", "left"), ("train loss", "right"), ("val clip top-1", "right"),
                          ("val video top-1", "right"), ("frames/s", "right"),
                          ("peak mem (MiB)", "right"), ("wall (s)", "right")]:
        table.add_column(name, justify=justify)
    for s in summaries:
        table.add_row(s["mode"], f"{s['train_loss']:.3f}", _pct(s["val_clip_top1"]),
                      _pct(s["val_video_top1"]), f"{s['frames_per_s']:.0f}",
                      f"{s['peak_mem_mb']:.0f}", f"{s['wall_s']:.0f}")
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
