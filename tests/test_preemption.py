"""A run stopped by a signal (SIGTERM, SLURM's SIGUSR1, Ctrl-C) finishes the step in hand, writes its
checkpoint, exits with the signal's status, leaves no process behind, and the same command then
ends exactly where the uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_depth_parallel import assert_same_run
from test_resume import invoke_ok, load, logged
from tiny import tiny_run_config

STEPS = 12


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    # dropout draws from the global RNG; an evaluation every step makes every stop one that
    # leaves its step's evaluation to the restarted run
    return tiny_run_config(tmp_path_factory.mktemp("preempt"), {
        "model": {"dropout": 0.3},
        "train": {"steps": STEPS, "eval_every": 1, "checkpoint_every": 5}}, generate=True)


def start(config: Path, out: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "sideways_cli", "train", str(config), "--out", str(out),
            "--deterministic", "--quiet", *extra]
    # a session (and process group) of its own: its loader workers are found through it
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def logged_steps(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return max((json.loads(line)["step"] for line in lines[:-1]), default=0)


def signal_once_training(process: subprocess.Popen, run: Path, signum: int, group: bool) -> None:
    """``signum`` to the process (or its whole group, as a terminal's Ctrl-C or SLURM sends it)
    once it has logged a step."""
    deadline = time.monotonic() + 120
    while logged_steps(run) < 1:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never logged a step"
        time.sleep(0.005)
    (os.killpg if group else os.kill)(process.pid, signum)


def group_gone_within(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def stopped_cleanly(process: subprocess.Popen, signum: int) -> int:
    """The process's step at the stop, after checking its exit: the signal's status, one line,
    no traceback, nothing of it left running a second later."""
    _, err = process.communicate(timeout=180)
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err, err
    stopped = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert len(stopped) == 1, err
    assert group_gone_within(process.pid, 1.0), "a process of the run outlived it"
    return int(stopped[0].split("after step ")[1].split(",")[0])


# SIGTERM to the process alone (Kubernetes, kill); Ctrl-C to the whole group, loader workers
# included (a terminal); SIGUSR1, SLURM's warning, is sent to a job's launcher below
SIGNALS = {"SIGTERM": (signal.SIGTERM, False), "Ctrl-C": (signal.SIGINT, True)}


@pytest.mark.multiprocess
def test_a_signalled_run_checkpoints_the_step_in_hand_and_leaves_nothing_running(config, tmp_path):
    """Runs with loader workers, signalled side by side once training. (That the same command
    then ends where the uninterrupted run ends is the job's test below: the same loop.)"""
    runs = {name: tmp_path / name for name in SIGNALS}
    running = {name: start(config, runs[name], "--set", "data.num_workers=2") for name in SIGNALS}
    for name, (signum, group) in SIGNALS.items():
        signal_once_training(running[name], runs[name], signum, group)
    for name, (signum, _) in SIGNALS.items():
        step = stopped_cleanly(running[name], signum)
        assert 0 < step < STEPS
        checkpoint = load(runs[name])
        assert checkpoint["step"] == step  # the checkpoint of the step in hand
        assert checkpoint["resume"]["pending_evaluation"]  # evaluated every step: left to the next start
        assert [m[0] for m in logged(runs[name])[0]] == list(range(1, step + 1))
        assert not list(runs[name].rglob("*.tmp"))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_signalled_job_stops_every_process_after_the_same_step(config, tmp_path):
    """SIGUSR1 (SLURM's warning ahead of a time limit) to the `sideways train` that launched a
    two-stage job: the agent passes it on, every stage finishes the same step and writes its
    shard, the job exits 138, and its checkpoint resumes to the uninterrupted single-process
    run's weights. (Resumed in this process from the shards: a 2-stage job resuming as one is
    test_depth_parallel's; a process would spend seconds importing torch.)"""
    run = tmp_path / "job"
    job = ("--mode", "sideways", "--set", "model.dropout=0")  # stages draw dropout apart
    process = start(config, run, *job, "--set", "parallel.stages=2")
    signal_once_training(process, run, signal.SIGUSR1, group=False)
    step = stopped_cleanly(process, signal.SIGUSR1)
    assert 0 < step < STEPS
    invoke_ok("train", config, *job, "--out", run, "--deterministic", "--quiet")
    straight = tmp_path / "straight"
    invoke_ok("train", config, *job, "--out", straight, "--deterministic", "--quiet")
    assert_same_run(straight, run)
    assert [m[0] for m in logged(run)[0]] == list(range(1, STEPS + 1))
