"""Frames/s of BP, tick-by-tick Sideways and chunked Sideways at several chunk sizes (CPU).

    python benchmarks/sideways_chunk.py [--json PATH] [--between-clips reset,continuous] [--threads N]

All rules are timed in one process, interleaved run by run, so that a change in machine load hits
every rule alike; each entry is the median of ``--runs`` batches after one warm-up batch. Each rule
trains its own copy of the model with SGD, as the trainer would.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from sideways_cli.engine.backprop import BackpropRule
from sideways_cli.engine.rule import GradientRule
from sideways_cli.engine.sideways import SidewaysRule
from sideways_cli.engine.sideways_chunked import ChunkedSideways
from sideways_cli.models import FrameStack, build_model

MODELS: dict[str, Callable[[], FrameStack]] = {
    "c3d-w8-d6": lambda: build_model("c3d", 10, width=8, depth=6),
    "vgg-w16-k3": lambda: build_model("vgg", 10, width=16, temporal_kernel=3),
}


def make_rules(model: FrameStack, between_clips: str,
               chunks: list[int]) -> dict[str, tuple[GradientRule, FrameStack]]:
    """Every rule with its own copy of the model, so that their updates do not interfere."""
    makers: dict[str, Callable[[FrameStack], GradientRule]] = {
        "bp": BackpropRule, "tick": functools.partial(SidewaysRule, between_clips=between_clips)}
    for chunk in chunks:
        makers[f"chunk {chunk}"] = functools.partial(ChunkedSideways, between_clips=between_clips,
                                                     chunk=chunk)
    rules = {}
    for key, make in makers.items():
        own = copy.deepcopy(model)
        rules[key] = (make(own), own)
    return rules


def time_batch(rule: GradientRule, model: FrameStack, clips: torch.Tensor,
               labels: torch.Tensor) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def apply_update() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    rule.train_batch(clips, labels, apply_update)
    return time.perf_counter() - start


def benchmark(name: str, between_clips: str, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    model = MODELS[name]()
    clips = torch.randn(args.batch, 3, args.frames, args.size, args.size)
    labels = torch.randint(0, 10, (args.batch,))
    rules = make_rules(model, between_clips, args.chunks)
    seconds: dict[str, list[float]] = {key: [] for key in rules}
    for run in range(args.runs + 1):  # run 0 is the warm-up
        for key, (rule, own) in rules.items():
            elapsed = time_batch(rule, own, clips, labels)
            if run:
                seconds[key].append(elapsed)
    frames = args.batch * args.frames
    bp = frames / statistics.median(seconds["bp"])
    return [{"model": name, "between_clips": between_clips, "rule": key,
             "frames_per_s": frames / statistics.median(times),
             "vs_bp": frames / statistics.median(times) / bp, "seconds": times}
            for key, times in seconds.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/sideways_chunk.json"))
    parser.add_argument("--between-clips", type=lambda text: text.split(","),
                        default=["reset", "continuous"], help="comma-separated values of sideways.between_clips")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--chunks", type=lambda text: [int(c) for c in text.split(",")],
                        default=[1, 4, 8, 16], help="comma-separated chunk sizes")
    parser.add_argument("--models", type=lambda text: text.split(","), default=list(MODELS),
                        help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads (default: torch's, one per core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    rows = [row for between_clips in args.between_clips for name in args.models
            for row in benchmark(name, between_clips, args)]
    load = [load_before, os.getloadavg()[0]]
    print(f"B={args.batch} T={args.frames} {args.size}x{args.size} "
          f"float32, {torch.get_num_threads()} threads, median of {args.runs}, "
          f"load average {load[0]:.1f} -> {load[1]:.1f}")
    print(f"{'between':<11} {'model':<11} {'rule':<9} {'frames/s':>9} {'vs BP':>6}")
    for row in rows:
        print(f"{row['between_clips']:<11} {row['model']:<11} {row['rule']:<9} "
              f"{row['frames_per_s']:>9.1f} {row['vs_bp']:>6.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "json"}
    config["load_average"] = load
    args.json.write_text(json.dumps({"config": config, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
