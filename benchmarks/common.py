"""Shared bits of the benchmark scripts: the default model and the result table."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

import torch
from rich.console import Console
from rich.table import Table

from sideways_cli.config import load_config
from sideways_cli.engine import make_rule
from sideways_cli.build import build_network

PRESET = Path(__file__).resolve().parents[1] / "experiments" / "synthetic.yaml"
RULES = {  # name -> (mode, chunk)
    "bp": ("bp", 1),
    "sideways-tick": ("sideways", 1),
    "sideways": ("sideways", None),  # the preset's chunk
}


def default_setup(overrides: list[str] | None = None):
    cfg = load_config(PRESET, overrides)
    return cfg, build_network(cfg, num_classes=10)


def rule_for(name: str, cfg, model):
    mode, chunk = RULES[name]
    return make_rule(mode, model, cfg.sideways.pipeline, cfg.sideways.update, chunk or cfg.sideways.chunk)


def random_batch(cfg, clip_len: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = clip_len or cfg.data.clip_len
    clips = torch.randn(cfg.data.batch_size, 3, t, cfg.data.size, cfg.data.size, generator=g)
    return clips, torch.randint(0, 10, (cfg.data.batch_size,), generator=g)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def emit(title: str, columns: list[str], rows: list[list], payload: dict, json_path: Path) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c != columns[0] else "left")
    for row in rows:
        table.add_row(*[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row])
    Console().print(table)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {json_path}")


def interleaved_arguments(description: str, json_path: Path, repeats: int,
                          batches: int) -> argparse.Namespace:
    """The options of a benchmark that interleaves its settings over repeats in two processes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--batches", type=int, default=batches,
                        help="timed batches per setting and repeat")
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--json", type=Path, default=json_path)
    return parser.parse_args()


def spawn_two(worker: Callable[..., None], *args: Any, raw: Path) -> Any:
    """Run ``worker(rank, *args, raw)`` in two spawned processes; what rank 0 saved to ``raw``."""
    raw.parent.mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(*args, str(raw)), nprocs=2)
    result = torch.load(raw)
    raw.unlink()
    return result
