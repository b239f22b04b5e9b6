"""A run directory nothing can corrupt: one writer at a time, readers that never see half a file,
failed writes as one line that keep the previous checkpoint, and no run discarded silently."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import run_main
from sideways_cli.run.lock import RunLock
from sideways_cli.run.rundir import read_jsonl
from sideways_cli.support.errors import UserError
from test_resume import invoke, invoke_ok, load, logged, tensors
from tiny import tiny_run_config


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return tiny_run_config(tmp_path_factory.mktemp("rundir"), {
        "train": {"steps": 6, "eval_every": 2, "checkpoint_every": 2}}, generate=True)


def sideways(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sideways_cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def one_line_error(process: subprocess.Popen, code: int = 2) -> str:
    """The one line a failed command printed, after checking its status and that there is no
    traceback."""
    _, err = process.communicate(timeout=180)
    assert process.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


# --- one writer ----------------------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(UserError, match=rf"is being written by another sideways process "
                                            rf"\(PID {os.getpid()} on "):
            with RunLock(tmp_path / "run"):
                pass
    with RunLock(tmp_path / "run"):  # released on exit
        pass


HOLD = """
import os, sys, time
from sideways_cli.run.lock import RunLock
lock = RunLock(sys.argv[1]).__enter__()
if os.fork() == 0:  # a data-loader worker, forked while the lock is held, outlives its parent
    time.sleep(30)
    os._exit(0)
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.multiprocess
def test_a_killed_holder_leaves_no_stale_lock_even_with_children_alive(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=f"PID {holder.pid} "):
            RunLock(tmp_path).__enter__()
        holder.kill()
        holder.wait()
        with RunLock(tmp_path):  # its forked child still runs, and holds nothing
            pass
    finally:
        os.killpg(holder.pid, signal.SIGKILL)


@pytest.mark.multiprocess
def test_train_and_compare_on_a_directory_being_trained_are_refused(config, tmp_path, monkeypatch,
                                                                   capsys):
    run = tmp_path / "run"
    first = sideways("train", config, "--out", run, "-q", "--set", "train.steps=400")
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.02)
        # the others from this process: the lock is the kernel's, between open files
        for args in (["train", config, "--out", run, "-q", "--set", "train.steps=400"],
                     ["compare", config, "--out", run, "-q", "--modes", "bp"]):
            code, err = run_main(args, monkeypatch, capsys)
            assert code == 2 and len(err.strip().splitlines()) == 1, err
            assert f"{run} is being written by another sideways process (PID {first.pid} on " in err
        # a reader meanwhile: the unfinished run is named, not half-read
        code, err = run_main(["compare", "--runs", run, "--out", tmp_path / "cmp"], monkeypatch, capsys)
        assert code == 2 and "has no summary.json" in err
        assert first.poll() is None  # the first run trains on, untouched
    finally:
        first.kill()
        first.communicate()


def test_logs_are_read_up_to_their_last_complete_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"st')  # a line being appended
    assert read_jsonl(log) == [{"step": 1}, {"step": 2}]
    log.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2 is not a JSON record"):
        read_jsonl(log)


# --- failed writes ---------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_while_logging_is_one_line(config, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to("/dev/full")  # every write to it: ENOSPC from the kernel
    code, err = run_main(["train", config, "--out", run, "-q"], monkeypatch, capsys)
    assert code == 2
    assert err.strip() == (f"error: cannot write {run / 'metrics.jsonl'}: No space left on "
                           "device; free some space")


@pytest.mark.multiprocess
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_checkpoint_on_a_full_disk_leaves_the_previous_one_and_no_tmp(config, tmp_path):
    run = tmp_path / "run"
    training = sideways("train", config, "--out", run, "-q", "--set", "train.steps=400")
    last, tmp = run / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt.tmp"
    while True:  # once a checkpoint stands, the next one is written to a full disk
        assert training.poll() is None, training.communicate()
        try:
            if last.is_file():
                tmp.symlink_to("/dev/full")
                break
        except FileExistsError:  # that checkpoint is being written right now
            pass
        time.sleep(0.005)
    before = torch.load(last, weights_only=True)["step"]
    error = one_line_error(training)
    assert error == f"error: cannot write {last}: No space left on device; free some space"
    assert not list(run.rglob("*.tmp"))
    assert torch.load(last, weights_only=True)["step"] in (before, before + 2)  # one whole file


# --- nothing discarded silently ------------------------------------------------------------


def test_a_run_with_logs_but_no_checkpoint_is_refused(config, tmp_path):
    run = tmp_path / "run"
    invoke_ok("train", config, "--out", run, "-q")
    (run / "checkpoints" / "last.pt").unlink()
    metrics = (run / "metrics.jsonl").read_text()
    refused = invoke("train", config, "--out", run, "-q")
    assert isinstance(refused.exception, UserError)
    assert str(refused.exception) == (
        f"{run} holds a run logged up to step 6 but no {run / 'checkpoints' / 'last.pt'} to "
        "resume from; pass --restart to train it from scratch, or give a new --out")
    assert (run / "metrics.jsonl").read_text() == metrics  # nothing touched
    invoke_ok("train", config, "--out", run, "-q", "--restart")


# --- a real full disk ----------------------------------------------------------------------


def _small_disk(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.multiprocess
def test_a_disk_that_fills_during_training_then_the_same_command_resumes(config, tmp_path):
    disk = tmp_path / "disk"
    if not _small_disk(disk, "4m"):
        pytest.skip("mounting a small tmpfs needs root in a system that allows it")
    try:
        run = disk / "run"
        args = ("train", config, "--out", run, "-q", "--deterministic", "--set", "train.steps=16",
                "--set", "train.checkpoint_every=3")
        process = sideways(*args)
        while not (run / "checkpoints" / "last.pt").is_file():
            assert process.poll() is None, process.communicate()
            time.sleep(0.01)
        filler = disk / "filler"
        with filler.open("wb") as f:  # take every free byte
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        error = one_line_error(process)
        assert "No space left on device; free some space" in error
        assert not list(run.rglob("*.tmp"))
        filler.unlink()
        invoke_ok(*args)  # the same command, here: a process would spend seconds importing torch
        straight = tmp_path / "straight"
        invoke_ok(*args[:3], straight, *args[4:])
        a, b = load(straight), load(run)
        assert all(torch.equal(x, y) for x, y in zip(tensors(a["model"]), tensors(b["model"])))
        assert logged(straight) == logged(run)
    finally:
        subprocess.run(["umount", "-l", str(disk)])


SAVE_PAST_A_SIZE_LIMIT = """
import resource, sys, torch
from pathlib import Path
from sideways_cli.run.rundir import save_checkpoint
from sideways_cli.support.errors import UserError
path = Path(sys.argv[1])
save_checkpoint({"w": torch.zeros(1000)}, path)  # a small checkpoint stands
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # Python ignores SIGXFSZ: EFBIG
try:
    save_checkpoint({"w": torch.zeros(1_000_000)}, path)
except UserError as exc:
    print(exc)
"""


@pytest.mark.multiprocess
def test_a_checkpoint_cut_short_mid_file_is_one_line_and_the_old_one_stands(tmp_path):
    """The write fails part-way through torch.save's zip archive, whose own clean-up then raises
    another error: the message still names the file and the cause."""
    path = tmp_path / "last.pt"
    result = subprocess.run([sys.executable, "-c", SAVE_PAST_A_SIZE_LIMIT, str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == f"cannot write {path}: File too large", result.stderr
    assert torch.load(path, weights_only=True)["w"].shape == (1000,)
    assert not list(tmp_path.glob("*.tmp"))
