"""A run killed mid-way and started again ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from crash_after_checkpoint import Crash, crash_after_first_checkpoint
from sideways_cli.cli import app
from sideways_cli.support.errors import UserError
from tiny import tiny_run_config
from tracked import tensorboard_scalars

STEPS, EVERY = 10, 3
TRACKED = ["--set", "log.tensorboard=true"]  # the curves continue as the logs do
# every knob of the training recipe: per-clip augmentation, MixUp and CutMix, label smoothing,
# clipping (at every step: the norms are above 0.05), accumulation, the EMA, the two best
# checkpoints kept and early stopping's count (3 evaluations without a better one: not reached)
RECIPE = [a for s in ("data.augment.resized_crop=[0.5,1.0]", "data.augment.randaugment=9",
                      "data.augment.erasing=0.5", "data.augment.mixup=0.4", "data.augment.cutmix=1.0",
                      "train.label_smoothing=0.1", "train.clip_grad_norm=0.05", "train.accumulate=2",
                      "train.ema_decay=0.8", "train.keep_best=2", "train.early_stop_patience=3",
                      "train.monitor=val_ema_clip_top1", "train.decay_norms_and_biases=false")
          for a in ("--set", s)]
CASES = {
    "bp": ["--mode", "bp", *TRACKED, *RECIPE],
    "sideways": ["--mode", "sideways", *TRACKED],  # the default chunked executor
    "continuous": ["--mode", "sideways", "--set", "sideways.between_clips=continuous", *TRACKED,
                   *RECIPE],
}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return tiny_run_config(tmp_path_factory.mktemp("resume"), {
        "seed": 5,
        # causal 3D convolutions (the chunked executor's sequence path) and dropout (the global RNG)
        "model": {"name": "c3d", "temporal_kernel": 3, "depth": 2, "dropout": 0.3},
        "data": {"synthetic": {"train_per_class": 2}},
        # 20 videos, 5 batches an epoch: the run crosses epochs and resumes mid-epoch
        "train": {"steps": STEPS, "log_every": 2, "warmup_steps": 2, "eval_every": 5,
                  "checkpoint_every": EVERY},
        "sideways": None}, generate=True)  # the default chunk; generated once, before any run


@pytest.fixture(autouse=True)
def restore_determinism():
    """In-process runs with --deterministic switch a process-wide flag; put it back."""
    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


CRASH = Path(__file__).with_name("crash_after_checkpoint.py")


def start(config: Path, out: Path, *extra: str, quiet: bool = True, crash: bool = False) -> subprocess.Popen:
    """``sideways train`` in a process of its own; with ``crash``, one that kills itself and its
    loader workers right after logging the first step past its first checkpoint."""
    program = [str(CRASH)] if crash else ["-m", "sideways_cli"]
    args = [sys.executable, *program, "train", str(config), "--out", str(out), "--deterministic",
            *extra] + (["--quiet"] if quiet else [])
    # a session of its own, so that killing its group takes its loader workers too
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate()
    assert process.returncode == 0, err
    return out


def crashed(process: subprocess.Popen, run: Path) -> int:
    """The step of the checkpoint a crashed run left."""
    _, err = process.communicate()
    assert process.returncode == -signal.SIGKILL, err
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)["step"]


def load(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)


def tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for key in sorted(tree, key=str) for t in tensors(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in tensors(item)]
    return []


def logged(run: Path) -> tuple[list[tuple], list[list[str]]]:
    """metrics.jsonl without its timings, and evaluations.csv without its wall times."""
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    with (run / "evaluations.csv").open() as f:
        rows = [{k: v for k, v in row.items() if k != "wall_s"} for row in csv.DictReader(f)]
    return [(m["step"], m["loss"], m["lr"], m["frames_seen"]) for m in metrics], rows


@pytest.mark.multiprocess
def test_killed_runs_resume_to_the_same_weights(config, tmp_path, monkeypatch):
    """Each case stops right after logging a step past its first checkpoint and is started again,
    then compared with the same run made uninterrupted. The continuous case is a real process
    SIGKILLed with its loader workers (the reference has none, so the same numbers also show the
    data does not depend on them) and started again as a process; the others stop in this process
    (a process spends most of its few seconds importing torch: what a kill adds is the same for all).
    BP and the continuous case run with the whole training recipe on: its weights' average, its
    gradient norms, its kept checkpoints and early stopping's count come back as well."""
    workers = {case: ["--set", "data.num_workers=2"] if case == "continuous" else [] for case in CASES}
    killed = {case: tmp_path / case for case in CASES}
    process = start(config, killed["continuous"], *CASES["continuous"], *workers["continuous"],
                    crash=True)
    for case in ("bp", "sideways"):
        with monkeypatch.context() as patched:
            crash_after_first_checkpoint(patched)
            with pytest.raises(Crash):
                invoke("train", config, *CASES[case], "--out", killed[case], "--deterministic",
                       "--quiet")
    steps = {case: load(killed[case])["step"] for case in ("bp", "sideways")}
    steps["continuous"] = crashed(process, killed["continuous"])
    assert steps == {case: EVERY for case in CASES}
    for case in CASES:  # stopped after logging a step past the checkpoint: the restart must trim it
        logged_steps = [json.loads(line)["step"] for line in (killed[case] / "metrics.jsonl").open()]
        assert logged_steps[-1] > EVERY, (case, logged_steps)
    resumed = start(config, killed["continuous"], *CASES["continuous"], *workers["continuous"],
                    quiet=False)
    said = {case: invoke_ok("train", config, *CASES[case], "--out", killed[case],
                            "--deterministic").output for case in ("bp", "sideways")}
    for case in CASES:  # meanwhile, the uninterrupted runs
        invoke_ok("train", config, *CASES[case], "--out", tmp_path / f"{case}-straight",
                  "--deterministic", "--quiet")
    said["continuous"] = finish(resumed)
    for case in CASES:
        assert unwrapped(f"resuming {killed[case]} from step {steps[case]}") in unwrapped(said[case]), case

    for case in CASES:
        straight = tmp_path / f"{case}-straight"
        a, b = load(straight), load(killed[case])
        for key in ("train_loss", "frames_seen", "updates", "val_clip_top1", "val_video_top1"):
            assert a["summary"][key] == b["summary"][key], (case, key)
        recipe = set(RECIPE) <= set(CASES[case])
        for part in ("model", "optimizer", "ema") if recipe else ("model", "optimizer"):
            expected, actual = tensors(a[part]), tensors(b[part])
            assert len(expected) == len(actual) > 0
            assert all(torch.equal(x, y) for x, y in zip(expected, actual)), (case, part)
        assert logged(straight) == logged(killed[case]), case  # no step logged twice, none missing
        assert [r["step"] for r in logged(killed[case])[1]] == ["5", "10"]
        assert same_curves(straight, killed[case]), case
        assert not list(killed[case].rglob("*.tmp"))
        if recipe:
            assert_same_recipe_state(straight, killed[case])


def assert_same_recipe_state(straight: Path, resumed: Path) -> None:
    """The recipe's carried state: the clipped norms logged, the best checkpoints kept, early
    stopping's count."""
    norms = [[json.loads(line)["grad_norm"] for line in (run / "metrics.jsonl").open()]
             for run in (straight, resumed)]
    assert norms[0] == norms[1] and all(n > 0.05 for n in norms[0])
    kept = [sorted(p.name for p in (run / "checkpoints").glob("best*.pt"))
            for run in (straight, resumed)]
    assert kept[0] == kept[1] and len(kept[0]) == 3  # best.pt and the two best of 5 and 10
    states = [load(run)["resume"] for run in (straight, resumed)]
    for key in ("best", "since_best", "kept_best"):
        assert states[0][key] == states[1][key], key


TIMINGS = ("train/frames_per_s", "train/data_wait_share", "memory/")


def same_curves(straight: Path, resumed: Path) -> bool:
    """TensorBoard shows the resumed run's curves as the uninterrupted run's: the same tags and
    steps, no point twice, the same values but for timings."""
    a, b = tensorboard_scalars(straight), tensorboard_scalars(resumed)
    assert a.keys() == b.keys() and "val/video_top1" in a
    for tag in a:
        assert [step for step, _ in a[tag]] == [step for step, _ in b[tag]], tag
        if not tag.startswith(TIMINGS):
            assert a[tag] == b[tag], tag
    return True


def unwrapped(text: str) -> str:
    """Without whitespace: rich wraps long lines (and long paths) at the console's width."""
    return "".join(text.split())


def invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def invoke_ok(*args) -> object:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def test_a_finished_run_is_reported_not_retrained(config, tmp_path):
    run = tmp_path / "run"
    first = invoke("train", config, "--mode", "bp", "--out", run, "--quiet", "--set", "train.steps=2")
    assert first.exit_code == 0, first.output
    stamp = (run / "checkpoints" / "last.pt").stat().st_mtime_ns
    again = invoke("train", config, "--mode", "bp", "--out", run, "--json", tmp_path / "s.json",
                   "--set", "train.steps=2", "--set", "data.num_workers=1")  # workers may differ
    assert again.exit_code == 0, again.output
    assert unwrapped(f"{run} has finished its 2 steps") in unwrapped(again.output)
    assert (run / "checkpoints" / "last.pt").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "s.json").read_text()) == json.loads((run / "summary.json").read_text())


def test_another_config_is_refused_and_restart_starts_over(config, tmp_path):
    run = tmp_path / "run"
    assert invoke("train", config, "--mode", "bp", "--out", run, "--quiet", "--set", "train.steps=2").exit_code == 0
    refused = invoke("train", config, "--mode", "bp", "--out", run, "--set", "train.steps=2",
                     "--set", "train.lr=0.5", "--seed", 1)
    assert isinstance(refused.exception, UserError)  # the CLI's main prints it as one line, exit 2
    assert "another config (seed 5 -> 1, train.lr 0.001 -> 0.5)" in str(refused.exception)
    restarted = invoke("train", config, "--mode", "bp", "--out", run, "--set", "train.steps=2",
                       "--set", "train.lr=0.5", "--seed", 1, "--restart", "--quiet")
    assert restarted.exit_code == 0, restarted.output
    assert load(run)["config"]["seed"] == 1
    assert len(logged(run)[1]) == 1  # the old run's evaluation rows are gone


def test_a_kill_during_the_final_evaluation_only_evaluates_again(config, tmp_path):
    run = tmp_path / "run"
    invoke_ok("train", config, "--mode", "bp", "--out", run, "--quiet", "--set", "train.steps=2", *TRACKED)
    finished_curves = tensorboard_scalars(run)
    finished = json.loads((run / "summary.json").read_text())
    # what a kill leaves after the final evaluation's row but before the final checkpoint
    ckpt = load(run)
    del ckpt["summary"]
    torch.save(ckpt, run / "checkpoints" / "last.pt")
    (run / "summary.json").unlink()
    result = invoke_ok("train", config, "--mode", "bp", "--out", run, "--set", "train.steps=2", *TRACKED)
    assert unwrapped(f"resuming {run} from step 2") in unwrapped(result.output)
    again = json.loads((run / "summary.json").read_text())
    timings = ("wall_s", "peak_mem_mb")
    assert {k: v for k, v in again.items() if k not in timings} == \
        {k: v for k, v in finished.items() if k not in timings}
    assert [row["step"] for row in logged(run)[1]] == ["2"]  # the final row once
    curves = tensorboard_scalars(run)  # the final step's points once, its training record kept
    assert {tag: [step for step, _ in points] for tag, points in curves.items()} == \
        {tag: [step for step, _ in points] for tag, points in finished_curves.items()}
    assert curves["train/loss"] == finished_curves["train/loss"]
    assert curves["val/video_top1"] == finished_curves["val/video_top1"]
    assert curves["val/video_top1"] == [(2, pytest.approx(finished["val_video_top1"], rel=1e-6))]

