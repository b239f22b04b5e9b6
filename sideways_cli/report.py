"""Rendering results: rich tables for people, JSON for scripts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.table import Table


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def compare_table(summaries: list[dict[str, Any]], title: str = "BP vs Sideways",
                  settings: list[dict[str, Any]] | None = None, names: list[str] | None = None,
                  fidelity: list[float | None] | None = None) -> Table:
    """One row per run. ``settings`` adds a column per compared key besides mode (swept, variant
    or --keys), ``names`` a run column, ``fidelity`` a mean-fidelity column; each only if given."""
    keys = [k for k in (settings[0] if settings else {}) if k != "mode"]
    leaves = [key.rsplit(".", 1)[-1] for key in keys]  # frame_stride: narrow enough for a terminal
    headers = (["run"] if names else []) + ["mode"]
    headers += [leaf if leaves.count(leaf) == 1 else key for key, leaf in zip(keys, leaves)]
    headers += ["train loss", "val clip top-1", "val video top-1", "frames/s", "peak mem (MiB)",
                "wall (s)"] + (["mean fidelity"] if fidelity else [])
    rows = []
    for i, s in enumerate(summaries):
        row = ([names[i]] if names else []) + [s["mode"]]
        row += [format_value(settings[i][key]) for key in keys] if settings else []
        row += [f"{s['train_loss']:.3f}", _pct(s["val_clip_top1"]), _pct(s["val_video_top1"]),
                f"{s['frames_per_s']:.0f}", f"{s['peak_mem_mb']:.0f}", f"{s['wall_s']:.0f}"]
        if fidelity:
            row.append("" if fidelity[i] is None else f"{fidelity[i]:.3f}")
        rows.append(row)
    table = Table(title=title)
    text_columns = len(headers) - 6 - bool(fidelity) - len(keys)  # run and mode
    for j, header in enumerate(headers):
        table.add_column(header, justify="left" if j < text_columns else "right")
    for row in rows:
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


def fidelity_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("#", justify="right")
    table.add_column("module")
    table.add_column("cosine(Sideways, BP)", justify="right")
    for row in rows:
        table.add_row(str(row["index"]), row["name"], f"{row['cosine']:.5f}")
    return table
