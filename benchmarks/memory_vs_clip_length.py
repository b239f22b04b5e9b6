"""Peak memory vs clip length for BP, Sideways and its staleness dial (stash D and full; docs/sideways.md,
property 6 and "The staleness dial"): the training step,
and the whole ``sideways train`` process as a user or a cluster scheduler sees it.

    python benchmarks/memory_vs_clip_length.py [--lengths 16,64,128] [--repeats 3] [--only step|whole]

Every point runs in a fresh process. The training step (random clips): the resident memory above
what the process held just before the step (the model and the input clip already allocated), with
a fixed glibc mmap threshold (``sideways_cli.support.memory.fresh_process_env``), since a freed allocation
stays in the allocator's heap and a second measurement in the same process would hide growth.
The whole process: the maximum resident set size of a complete ``sideways train`` run (2 steps,
the final evaluation, the checkpoint) on the embedded dataset with the default preset, read from
the kernel when it ends (``wait4``, what ``/usr/bin/time -f %M`` prints), in the user's environment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import PRESET, RULES, default_setup, emit, median, random_batch, rule_for, stash_of
from sideways_cli.config import load_config
from sideways_cli.data.catalog import resolve_dataset
from sideways_cli.support.memory import PeakMemory, fresh_process_env

# a whole run's settings, name -> (--mode, sideways.stash): every rule at the preset's chunk (the
# tick rule, chunk 1, is the step table's alone)
WHOLE_RUNS = {name: (mode, stash) for name, (mode, chunk, stash) in RULES.items()
              if chunk is None or mode == "bp"}


def measure_one(rule_name: str, clip_len: int) -> float:
    cfg, model = default_setup()
    clips, labels = random_batch(cfg, clip_len)
    rule = rule_for(rule_name, cfg, model)
    with PeakMemory(torch.device("cpu")) as peak:
        rule.train_batch(clips, labels, apply_update=lambda: None)
    return peak.peak_mb


def warm_peaks(rule_name: str, clip_lens: list[int]) -> list[float]:
    """Each length's peak in this one process, after an unmeasured step at the first length: what
    the steps themselves hold, without the first step's one-time allocations. With
    ``fresh_process_env``'s malloc setting a step's large blocks go back to the system when freed,
    so one step hides nothing of the next one's."""
    measure_one(rule_name, clip_lens[0])
    return [measure_one(rule_name, clip_len) for clip_len in clip_lens]


def peak_in_fresh_process(rule_name: str, clip_len: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--one", rule_name, str(clip_len)], check=True,
                         capture_output=True, text=True, env=fresh_process_env(), timeout=600)
    return float(out.stdout)


def whole_run_settings(data_root: Path, longest: int) -> list[str]:
    """A short but complete run: videos as long as the longest clip (no padded frames), a
    validation set of 80 clips (2.5 evaluation batches: as many as the peak needs)."""
    return ["train.steps=2", "train.checkpoint_every=0", f"data.root={data_root}",
            f"data.synthetic.num_frames={longest}", "data.synthetic.train_per_class=4",
            "data.synthetic.val_per_class=4"]


def max_rss_of_train(mode: str, clip_len: int, settings: list[str], out: Path) -> float:
    """MiB: the kernel's maximum resident set size of one ``sideways train`` process."""
    args = [sys.executable, "-m", "sideways_cli", "train", str(PRESET), "--mode", mode, "--quiet",
            "--restart", "--out", str(out), "--set", f"data.clip_len={clip_len}"]
    for setting in settings:
        args += ["--set", setting]
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: nothing blocks the child
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            errors.seek(0)
            raise RuntimeError(f"sideways train failed: {errors.read().decode()}")
    return usage.ru_maxrss / 1024  # KiB on Linux


def step_table(lengths: list[int], repeats: int, json_dir: Path) -> None:
    rules = list(RULES)
    peaks: dict[str, dict[int, float]] = {r: {} for r in rules}
    for rule in rules:
        for t in lengths:
            peaks[rule][t] = median([peak_in_fresh_process(rule, t) for _ in range(repeats)])
    first, last = lengths[0], lengths[-1]
    rows = [[r] + [peaks[r][t] for t in lengths] + [peaks[r][last] / peaks[r][first],
                                                    peaks[r][last] / peaks["bp"][last]] for r in rules]
    cfg, _ = default_setup()
    emit(f"peak training-step memory (MiB) vs clip length, {cfg.model.name}, B={cfg.data.batch_size}",
         ["rule"] + [f"T={t}" for t in lengths] + [f"T={last} / T={first}", f"x BP at T={last}"],
         rows, {"model": cfg.model.name, "batch": cfg.data.batch_size, "peak_mb": peaks},
         json_dir / "memory_vs_clip_length.json")


def whole_table(lengths: list[int], repeats: int, json_dir: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="sideways-memory-") as tmp:
        settings = whole_run_settings(Path(tmp) / "data", max(lengths))
        resolve_dataset(load_config(PRESET, settings).data, progress=False)  # not part of any run
        _, model = default_setup()
        peaks: dict[str, dict[int, list[float]]] = {r: {t: [] for t in lengths} for r in WHOLE_RUNS}
        for _ in range(repeats):  # interleaved: machine noise hits every point alike
            for run, (mode, stash) in WHOLE_RUNS.items():
                stashed = settings + [f"sideways.stash={stash_of(stash, model)}"]
                for t in lengths:
                    peaks[run][t].append(max_rss_of_train(mode, t, stashed, Path(tmp) / "run"))
    medians = {m: {t: median(v) for t, v in by_t.items()} for m, by_t in peaks.items()}
    first, last = lengths[0], lengths[-1]
    rows = [[m] + [medians[m][t] for t in lengths]
            + [medians[m][last] / medians[m][first], medians[m][last] / medians["bp"][last]]
            for m in WHOLE_RUNS]
    emit("maximum resident set (MiB) of a whole `sideways train` run (2 steps, evaluation, "
         "checkpoint) vs clip length",
         ["run"] + [f"T={t}" for t in lengths] + [f"T={last} / T={first}", f"x BP at T={last}"],
         rows, {"preset": PRESET.name, "runs": peaks, "median_mb": medians},
         json_dir / "memory_whole_process.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="16,64,128")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("step", "whole"))
    parser.add_argument("--one", nargs=2, metavar=("RULE", "CLIP_LEN"), help=argparse.SUPPRESS)
    parser.add_argument("--warm", nargs="+", metavar="RULE=LEN,LEN", help=argparse.SUPPRESS)
    parser.add_argument("--json-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]))))
        return
    if args.warm:  # tests/test_memory.py's measurements: {rule: [peak at each length]}
        series = dict(spec.split("=") for spec in args.warm)
        print(json.dumps({rule: warm_peaks(rule, [int(t) for t in lengths.split(",")])
                          for rule, lengths in series.items()}))
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.only != "whole":
        step_table(lengths, args.repeats, args.json_dir)
    if args.only != "step":
        whole_table(lengths, args.repeats, args.json_dir)


if __name__ == "__main__":
    main()
