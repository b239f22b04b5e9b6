"""Peak training memory vs clip length for BP and Sideways (SIDEWAYS.md, property 6).

    python benchmarks/memory_vs_clip_length.py [--lengths 16,64,128] [--repeats 3]

Each point runs in a fresh process (with a fixed glibc mmap threshold, see
``sideways_cli.memory.fresh_process_env``): a freed allocation stays in the allocator's heap, so a
second measurement in the same process would hide growth. The peak is the resident memory above what the
process held just before the training step (the model and the input clip already allocated).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from common import RULES, default_setup, emit, median, random_batch, rule_for
from sideways_cli.memory import PeakMemory, fresh_process_env


def measure_one(rule_name: str, clip_len: int) -> float:
    cfg, model = default_setup()
    clips, labels = random_batch(cfg, clip_len)
    rule = rule_for(rule_name, cfg, model)
    with PeakMemory(torch.device("cpu")) as peak:
        rule.train_batch(clips, labels, apply_update=lambda: None)
    return peak.peak_mb


def peak_in_fresh_process(rule_name: str, clip_len: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--one", rule_name, str(clip_len)], check=True,
                         capture_output=True, text=True, env=fresh_process_env(), timeout=600)
    return float(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="16,64,128")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("RULE", "CLIP_LEN"), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path,
                        default=Path(__file__).parent / "results" / "memory_vs_clip_length.json")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]))))
        return

    lengths = [int(x) for x in args.lengths.split(",")]
    rules = args.rules.split(",")
    peaks: dict[str, dict[int, float]] = {r: {} for r in rules}
    for rule in rules:
        for t in lengths:
            peaks[rule][t] = median([peak_in_fresh_process(rule, t) for _ in range(args.repeats)])
    first, last = lengths[0], lengths[-1]
    rows = [[r] + [peaks[r][t] for t in lengths] + [peaks[r][last] / peaks[r][first],
                                                    peaks[r][last] / peaks["bp"][last]] for r in rules]
    cfg, _ = default_setup()
    emit(f"peak training memory (MiB) vs clip length, {cfg.model.name}, B={cfg.data.batch_size}",
         ["rule"] + [f"T={t}" for t in lengths] + [f"T={last} / T={first}", f"x BP at T={last}"],
         rows, {"model": cfg.model.name, "batch": cfg.data.batch_size, "peak_mb": peaks}, args.json)


if __name__ == "__main__":
    main()
