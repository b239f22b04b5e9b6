"""Do the Sideways executors train to the same weights? Whole `sideways train` runs, compared.

    python benchmarks/executor_agreement.py [--seeds 3] [--steps 4] [--precisions float32,float64]

Every executor (the tick rule, the chunked one at several chunks, two stages of either) trains the
embedded dataset from the same seed with --deterministic, for each optimizer; the table gives the
largest difference of any weight tensor from the tick rule's (max |difference| / max |weight|,
median and worst over seeds) after ``--steps`` steps. The baseline row is the tick rule itself at
one thread instead of two: the same computation, its sums split differently, i.e. what moving a
run to another machine does. In float64 every executor agrees to round-off; in float32 each
agrees at every step to round-off, and over steps they part as the baseline does, because
max-pool and ReLU route gradients by comparisons that a rounding can flip, and training feeds the
difference back.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import PRESET, emit
from sideways_cli.config import load_config
from sideways_cli.data.catalog import resolve_dataset

EXECUTORS = {  # name -> (settings, environment); the first is the reference
    "tick rule (chunk 1)": (["sideways.chunk=1"], {}),
    "chunk 4": (["sideways.chunk=4"], {}),
    "chunk 8 (default)": (["sideways.chunk=8"], {}),
    "chunk 16": (["sideways.chunk=16"], {}),
    "2 stages, tick rule": (["sideways.chunk=1", "parallel.stages=2"], {}),
    "2 stages, chunk 8": (["sideways.chunk=8", "parallel.stages=2"], {}),
    "baseline: tick rule, 1 thread": (["sideways.chunk=1"], {"OMP_NUM_THREADS": "1"}),
}
OPTIMIZERS = {"sgd": ["train.optimizer=sgd", "train.lr=0.05"], "adamw": ["train.optimizer=adamw"]}


def settings(data_root: Path, steps: int) -> list[str]:
    """The issue's setting: the default preset, 8 training videos per class, no evaluation but
    the final one."""
    return [f"data.root={data_root}", f"train.steps={steps}", "train.eval_every=0",
            "data.synthetic.train_per_class=8", "data.synthetic.val_per_class=2"]


def train(out: Path, sets: list[str], env: dict[str, str]) -> dict[str, torch.Tensor]:
    args = [sys.executable, "-m", "sideways_cli", "train", str(PRESET), "--mode", "sideways",
            "--deterministic", "--quiet", "--restart", "--out", str(out)]
    for setting in sets:
        args += ["--set", setting]
    subprocess.run(args, check=True, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                   timeout=900)
    return torch.load(out / "checkpoints" / "last.pt", weights_only=False)["model"]


def difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest over tensors of max |a - b| / max |b|."""
    return max(((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max()).item()
               for k in b if b[k].is_floating_point() and b[k].abs().max() > 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--precisions", default="float32,float64")
    parser.add_argument("--json", type=Path,
                        default=Path(__file__).parent / "results" / "executor_agreement.json")
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    columns = list(itertools.product(precisions, OPTIMIZERS))
    diffs: dict[str, dict[str, list[float]]] = {e: {f"{p} {o}": [] for p, o in columns}
                                                for e in EXECUTORS}
    reference = next(iter(EXECUTORS))
    with tempfile.TemporaryDirectory(prefix="sideways-agreement-") as tmp:
        base = settings(Path(tmp) / "data", args.steps)
        resolve_dataset(load_config(PRESET, base).data, progress=False)  # generated once
        for seed, (precision, optimizer) in itertools.product(range(args.seeds), columns):
            common = base + OPTIMIZERS[optimizer] + [f"seed={seed}", f"precision={precision}"]
            weights = {name: train(Path(tmp) / "run", common + sets, env)
                       for name, (sets, env) in EXECUTORS.items()}
            for name in EXECUTORS:
                diffs[name][f"{precision} {optimizer}"].append(
                    difference(weights[name], weights[reference]))
            print(f"seed {seed}, {precision}, {optimizer}: done", flush=True)
    rows = [[name] + [f"{statistics.median(d[f'{p} {o}']):.1e} / {max(d[f'{p} {o}']):.1e}"
                      for p, o in columns] for name, d in diffs.items() if name != reference]
    emit(f"weights after {args.steps} steps vs the tick rule's, median / worst of {args.seeds} "
         "seeds (max |difference| / max |weight| over tensors)",
         ["executor"] + [f"{p}, {o}" for p, o in columns], rows,
         {"steps": args.steps, "seeds": args.seeds, "differences": diffs}, args.json)


if __name__ == "__main__":
    main()
