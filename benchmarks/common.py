"""Shared bits of the benchmark scripts: the default model and the result table."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

import torch
from rich.console import Console
from rich.table import Table

from sideways_cli.config import load_config
from sideways_cli.engine import make_rule
from sideways_cli.run.build import build_network

PRESET = Path(__file__).resolve().parents[1] / "experiments" / "synthetic.yaml"
DEPTH = "D"  # a stash as deep as the network has modules
RULES = {  # name -> (mode, chunk, sideways.stash)
    "bp": ("bp", 1, 0),
    "sideways-tick": ("sideways", 1, 0),
    "sideways": ("sideways", None, 0),  # the preset's chunk
    # the staleness dial: messages paired with kept activations, recomputed (docs/sideways.md)
    "sideways-stash-D": ("sideways", None, DEPTH),
    "sideways-stash-full": ("sideways", None, "full"),
}


def default_setup(overrides: list[str] | None = None):
    cfg = load_config(PRESET, overrides)
    return cfg, build_network(cfg, num_classes=10)


def rule_for(name: str, cfg, model, chunk: int | None = None):
    """The rule ``name`` of :data:`RULES` on ``model``; ``chunk`` replaces a Sideways rule's."""
    mode, own_chunk, stash = RULES[name]
    return make_rule(mode, model, cfg.sideways.between_clips, cfg.sideways.update,
                     chunk or own_chunk or cfg.sideways.chunk, stash=stash_of(stash, model))


def stash_of(stash, model) -> int | str:
    """A :data:`RULES` stash as the engine takes it: :data:`DEPTH` is the model's module count."""
    return len(model) if stash == DEPTH else stash


def random_batch(cfg, clip_len: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = clip_len or cfg.data.clip_len
    clips = torch.randn(cfg.data.batch_size, 3, t, cfg.data.size, cfg.data.size, generator=g)
    return clips, torch.randint(0, 10, (cfg.data.batch_size,), generator=g)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def seconds_of(work: Callable[[], Any], device: torch.device = torch.device("cpu")) -> float:
    """How long ``work`` takes. On CUDA, the GPU's time between events recorded around it: the
    host returns from a kernel launch long before the kernel ends."""
    if device.type != "cuda":
        start = time.perf_counter()
        work()
        return time.perf_counter() - start
    torch.cuda.synchronize(device)  # nothing queued before counts
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    work()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def time_rules(rules: dict[str, Any], model, clips: torch.Tensor, labels: torch.Tensor,
               repeats: int, device: torch.device = torch.device("cpu"),
               warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of one training batch of each rule (no optimizer step), ``repeats`` times each,
    interleaved so that machine noise hits all alike; the first ``warmup`` rounds (allocators,
    kernels) are not kept."""
    times: dict[str, list[float]] = {name: [] for name in rules}
    for repeat in range(warmup + repeats):
        for name, rule in rules.items():
            model.zero_grad(set_to_none=True)
            seconds = seconds_of(lambda: rule.train_batch(clips, labels, apply_update=lambda: None),
                                 device)
            if repeat >= warmup:
                times[name].append(seconds)
    return times


def emit(title: str, columns: list[str], rows: list[list], payload: dict, json_path: Path,
         whole: bool = False) -> None:
    """The table, then the JSON. ``whole``: in a log or a pipe, at the table's full width rather
    than wrapped to 80 columns (long cells: reasons, several figures)."""
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c != columns[0] else "left")
    for row in rows:
        table.add_row(*[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row])
    if whole:
        from sideways_cli.cli import print_whole
        print_whole(table)
    else:
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
