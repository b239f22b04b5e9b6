"""Training frames/s of BP vs Sideways on the default model, measured in one run.

    python benchmarks/throughput.py [--repeats 5] [--json benchmarks/results/throughput.json]

Engine throughput only (random clips, no decoding): each repeat times one batch of every rule,
interleaved, so machine noise hits all rules alike; the table gives medians over repeats.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import RULES, default_setup, emit, median, random_batch, rule_for, time_rules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "throughput.json")
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    args = parser.parse_args()

    cfg, model = default_setup(args.set)
    clips, labels = random_batch(cfg)
    rules = {name: rule_for(name, cfg, model) for name in RULES}
    frames = clips.shape[0] * clips.shape[2]
    times = time_rules(rules, model, clips, labels, args.repeats)  # after a round of warm-up
    fps = {name: frames / median(ts) for name, ts in times.items()}
    rows = [[name, fps[name], fps[name] / fps["bp"]] for name in rules]
    payload = {"model": cfg.model.name, "temporal_kernel": cfg.model.temporal_kernel,
               "batch": cfg.data.batch_size, "clip_len": cfg.data.clip_len, "size": cfg.data.size,
               "chunk": cfg.sideways.chunk, "threads": torch.get_num_threads(), "repeats": args.repeats,
               "frames_per_s": fps, "seconds": times}
    emit(f"training throughput, {cfg.model.name}, B={cfg.data.batch_size}, T={cfg.data.clip_len}, "
         f"{torch.get_num_threads()} threads", ["rule", "frames/s (median)", "x BP"], rows, payload, args.json)


if __name__ == "__main__":
    main()
